"""Write the training prompts for the Qwen2.5-Coder drafter: chat requests built offline from the standard library.

    python demos/qwen-coder/make_prompts.py --out ~/.cache/treeflash-work/qwen-coder/prompts.jsonl

Every line is ``{"messages": [...]}``. The requests are of the kinds a coding assistant gets (and of the shape
the HumanEval evaluation uses: complete a function from its signature and docstring), built from the
standard library's own functions, classes and docstrings, plus templates of common programming tasks and a
few multi-turn chats. HumanEval is the evaluation set: its entry points are never used here, and a test checks
that no HumanEval prompt appears in the output.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import random
import re
import textwrap
import warnings
from pathlib import Path

MODULES = """
abc argparse array ast base64 bisect calendar cmath collections colorsys configparser contextlib copy csv dataclasses
datetime decimal difflib enum filecmp fnmatch fractions ftplib functools getopt gettext glob graphlib gzip hashlib heapq
hmac html html.parser http.cookies imaplib inspect io ipaddress itertools json json.decoder json.encoder keyword
linecache locale logging lzma mailbox math mimetypes numbers operator optparse os os.path pathlib pickle pkgutil
platform plistlib poplib pprint queue quopri random re reprlib sched secrets selectors shelve shlex shutil signal
smtplib socket sqlite3 statistics string stringprep struct subprocess tarfile tempfile textwrap threading timeit
tokenize tomllib trace traceback types typing unicodedata urllib.parse urllib.request uuid warnings wave weakref
xml.dom.minidom xml.etree.ElementTree zipfile zlib
""".split()

FUNCTION_REQUESTS = [
    "Complete the following Python function:\n```python\n{stub}\n```",
    "Complete the following Python function:\n```python\n{stub}\n```",
    "Write the body of this Python function.\n```python\n{stub}\n```",
    "Implement `{name}` in plain Python without importing `{module}`. Its documentation says:\n\n{doc}",
    "Write a Python function `{name}{sig}`. {summary}",
    "Explain what `{module}.{name}` does and give a short usage example.",
    "Write pytest unit tests for `{module}.{name}`.",
]
SOURCE_REQUESTS = [
    "Explain how this code works:\n```python\n{source}\n```",
    "Add type hints to this function and return the full code:\n```python\n{source}\n```",
    "Refactor this function to be more readable:\n```python\n{source}\n```",
    "Find possible bugs or edge cases in this code:\n```python\n{source}\n```",
]
CLASS_REQUESTS = [
    "Write a Python class `{name}` that behaves like `{module}.{name}`. Its documentation says:\n\n{doc}",
    "Show how to use `{module}.{name}` with a small example program.",
]
TASKS = """
reverse a linked list|check whether a string is a palindrome, ignoring case and punctuation|merge two sorted lists
|find the longest common prefix of a list of strings|count word frequencies in a text|flatten a nested list
|compute the n-th Fibonacci number iteratively|check whether a number is prime|return all prime numbers below n
|find the greatest common divisor of two integers|convert a Roman numeral to an integer|convert an integer to binary
|rotate a matrix by 90 degrees|transpose a matrix given as a list of lists|find the median of a list of numbers
|remove duplicates from a list while keeping the order|group a list of words into anagrams|validate an email address
|parse a CSV line with quoted fields|compute the running average of a stream of numbers|implement binary search
|implement quicksort|implement merge sort|implement a stack with a list|implement a queue with two stacks
|find the k largest elements of a list|check whether brackets in a string are balanced|compute the edit distance
|find the longest increasing subsequence|count the vowels in a string|capitalize the first letter of every word
|sum the digits of an integer|check whether two strings are anagrams|find the missing number in 1..n
|return the intersection of two lists|compute the factorial of n recursively|generate all permutations of a string
|generate all subsets of a set|find the maximum subarray sum|compute the power set of a list|read a text file and count lines
|write a dictionary to a JSON file|parse a date string in ISO format|compute the number of days between two dates
|implement an LRU cache|find the first non-repeating character of a string|encode a string with run-length encoding
|decode a run-length encoded string|check whether a year is a leap year|convert Celsius to Fahrenheit for a list of values
|find all pairs in a list that sum to a target|compute the dot product of two vectors|multiply two matrices
|return the n most common elements of a list|split a list into chunks of size n|zip two lists into a dictionary
|find the second largest number in a list|check whether a list is sorted|rotate a list by k positions
|count the set bits of an integer|compute the Hamming distance of two strings|convert a string to snake_case
|convert snake_case to camelCase|truncate a string to n characters with an ellipsis|strip HTML tags from a string
|find the longest word in a sentence|compute the area of a polygon from its vertices|compute a moving average
|simulate rolling two dice 1000 times and count the sums|implement a simple tokenizer for arithmetic expressions
|evaluate an arithmetic expression given as a string|implement a trie with insert and search
|perform a breadth-first search on a graph given as an adjacency list|detect a cycle in a directed graph
|compute the shortest path with Dijkstra's algorithm|topologically sort a dependency graph
|implement a min-heap class|count the islands in a grid of 0s and 1s|solve the N-queens problem
|compute all combinations of k elements|find the majority element of a list|compress a string like aabccc -> a2b1c3
|check whether a Sudoku board is valid|return the digits of a number as a list|format a number with thousands separators
|compute the sum of a list without using sum|return the cumulative sum of a list|interleave two strings
""".replace("\n", "").split("|")
TASK_REQUESTS = [
    "Write a Python function to {task}.",
    "Write a Python function to {task}. Include a docstring and a few doctests.",
    "How would you {task} in Python? Show the code.",
    "Write an efficient Python solution to {task} and state its time complexity.",
    "Write a JavaScript function to {task}.",
]
CHATS = [
    ("What is the difference between a list and a tuple in Python?", "Lists are mutable, tuples are not."),
    ("How do I open a file in Python?", "Use the built-in open() function, ideally in a with statement."),
    ("What is a decorator?", "A function that takes a function and returns a new one that wraps it."),
    ("Explain list comprehensions.", "They build a list from an iterable in one expression."),
    ("What does `yield` do?", "It turns a function into a generator that produces values lazily."),
    ("How do I sort a dictionary by value?", "Use sorted(d.items(), key=lambda kv: kv[1])."),
]
FOLLOW_UPS = ["Show me an example.", "Can you make it shorter?", "Now write a test for it.",
              "Explain it step by step.", "What are common mistakes?"]


def first_sentence(doc: str) -> str:
    text = " ".join(doc.strip().split("\n\n")[0].split())
    match = re.match(r"(.+?[.!?])(\s|$)", text)
    return (match.group(1) if match else text)[:300]


def stub(name: str, sig: str, doc: str) -> str:
    body = textwrap.indent('"""' + textwrap.dedent(doc).strip() + '\n"""', "    ")
    return f"def {name}{sig}:\n{body}\n"


def members(excluded: set[str]):
    """(kind, module, name, signature, docstring, source or None) of documented public functions and classes."""
    warnings.simplefilter("ignore")
    for module_name in MODULES:
        try:
            module = importlib.import_module(module_name)
        except Exception:
            continue
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or name in excluded or getattr(obj, "__module__", None) != module.__name__:
                continue
            doc = inspect.getdoc(obj)
            if not doc or len(doc) < 20:
                continue
            doc = doc[:1200]
            kind = "class" if inspect.isclass(obj) else "function" if callable(obj) else None
            if kind is None:
                continue
            try:
                sig = str(inspect.signature(obj))
            except (TypeError, ValueError):
                sig = "(*args, **kwargs)"
            try:
                source = inspect.getsource(obj) if kind == "function" else None
            except (OSError, TypeError):
                source = None
            if source and len(source) > 2500:
                source = None
            yield kind, module_name, name, sig, doc, source


def build(excluded: set[str], rng: random.Random) -> list[dict]:
    requests = []
    for kind, module, name, sig, doc, source in members(excluded):
        fields = dict(module=module, name=name, sig=sig, doc=doc, summary=first_sentence(doc), stub=stub(name, sig, doc))
        if kind == "function":
            for template in rng.sample(FUNCTION_REQUESTS, 3):
                requests.append(template.format(**fields))
            if source:
                requests.append(rng.choice(SOURCE_REQUESTS).format(source=source.rstrip()))
        else:
            requests.append(rng.choice(CLASS_REQUESTS).format(**fields))
    for task in TASKS:
        for template in TASK_REQUESTS:
            requests.append(template.format(task=task))
    out = [{"messages": [{"role": "user", "content": r}]} for r in requests]
    for question, answer in CHATS:
        for follow in FOLLOW_UPS:
            out.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer},
                                     {"role": "user", "content": follow}]})
    rng.shuffle(out)
    return out


def humaneval_names(path: Path | None) -> set[str]:
    if path is None or not path.is_file():
        return set()
    return {json.loads(line)["entry_point"] for line in path.read_text().splitlines() if line.strip()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--humaneval", type=Path, default=Path.home() / ".cache/treeflash-models/humaneval/HumanEval.jsonl",
                   help="HumanEval.jsonl: its entry points are kept out of the training prompts")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    prompts = build(humaneval_names(args.humaneval), random.Random(args.seed))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(x) + "\n" for x in prompts))
    print(f"{len(prompts)} prompts -> {args.out}")


if __name__ == "__main__":
    main()
