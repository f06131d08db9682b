"""Drafter training: the loss falls, a resumed run ends where an uninterrupted one does, all three modes work."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import save_target, tiny_target
from mlx.utils import tree_flatten

from treeflash_mlx.checkpoints import load_drafter
import treeflash_mlx.train as train_module
from treeflash_mlx.train import build_parser, train

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int\n    y: int\n" * 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    target = tiny_target("qwen3", seed=9)
    data = root / "corpus.py"
    data.write_text(TEXT)
    prompts = root / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"def f{i}(x):"}) for i in range(4)))
    return save_target(target, root / "target"), data, prompts, root


def run(setup, out, *extra):
    target_dir, data, prompts, _ = setup
    argv = ["--model", str(target_dir), "--data", str(data), str(prompts), "--out", str(out), "--block-size", "6",
            "--num-prompts", "12", "--prompt-tokens", "12", "--gen-tokens", "24", "--batch", "3", "--anchors", "4",
            "--eval-prompts", "2", "--eval-tokens", "12", "--lr", "3e-3", "--force", *map(str, extra)]
    return train(build_parser().parse_args(argv))


def weights(path):
    return {k: np.array(v) for k, v in tree_flatten(load_drafter(path)[0].parameters())}


def test_loss_falls_and_the_drafter_loads_and_is_evaluated(setup, tmp_path):
    report = run(setup, tmp_path / "d", "--steps", 40)
    drafter, _ = load_drafter(tmp_path / "d")
    assert drafter.has_head and drafter.args.block_size == 6
    assert set(report["mean_acceptance_length"]) == {"treeflash", "marginal", "chain"}
    assert all(tau >= 1 for tau in report["mean_acceptance_length"].values())
    first = run(setup, tmp_path / "one", "--steps", 1)["final_loss"]
    assert report["final_loss"] < 0.7 * first


def test_an_interrupted_run_resumes_to_the_same_state(setup, tmp_path, monkeypatch):
    run(setup, tmp_path / "straight", "--steps", 6, "--save-every", 3)
    real, calls = train_module.losses, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 4:  # during step 4, after the checkpoint of step 3
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(train_module, "losses", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(setup, tmp_path / "resumed", "--steps", 6, "--save-every", 3)
    monkeypatch.setattr(train_module, "losses", real)
    (state,) = (tmp_path / "resumed.work").glob("runs/*/state.json")
    assert json.loads(state.read_text())["step"] == 3
    run(setup, tmp_path / "resumed", "--steps", 6, "--save-every", 3)
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_head_mode_trains_only_the_head_of_a_dflash_drafter(setup, tmp_path):
    base = run(setup, tmp_path / "dflash", "--steps", 3, "--mode", "backbone")
    assert "treeflash" not in base["mean_acceptance_length"]
    run(setup, tmp_path / "upgraded", "--steps", 5, "--mode", "head", "--drafter", tmp_path / "dflash")
    before, after = weights(tmp_path / "dflash"), weights(tmp_path / "upgraded")
    for k, v in before.items():
        np.testing.assert_array_equal(after[k], v, err_msg=f"{k} must stay frozen")
    assert any(k.startswith("ar_approximation") for k in after)
    assert np.abs(after["ar_approximation.d.weight"]).max() > 0, "the head must have learned"


def test_head_mode_needs_a_drafter(setup, tmp_path):
    with pytest.raises(ValueError, match="--mode head trains a head on an existing DFlash drafter"):
        run(setup, tmp_path / "x", "--steps", 1, "--mode", "head")


def test_training_pass_equals_the_inference_drafter_at_every_anchor():
    """Many blocks in one masked training pass give what drafting gives, block by block."""
    import mlx.core as mx

    from conftest import tiny_drafter
    from treeflash_mlx.train import block_hidden

    target = tiny_target("qwen3", seed=2)
    drafter = tiny_drafter(target, layers=2, block_size=5)
    rng = np.random.default_rng(0)
    T, F = 20, len(drafter.args.target_layer_ids) * 64
    features = mx.array(rng.normal(size=(2, T, F)).astype(np.float32))
    anchors = mx.array([[3, 9, 14], [1, 7, 15]])
    blocks = target.model.embed_tokens(mx.array(rng.integers(0, 255, size=(2, 3, 5))))
    trained = block_hidden(drafter, features, blocks, anchors)
    for s in range(2):
        for j in range(3):
            a = int(anchors[s, j])
            cache = drafter.make_cache()
            drafter.append_context(features[s : s + 1, :a], cache)
            want = drafter(blocks[s, j][None], cache)[0]
            np.testing.assert_allclose(np.array(trained[s, j]), np.array(want), atol=1e-4, rtol=1e-4)


def test_bad_settings_fail_before_any_work(setup, tmp_path):
    with pytest.raises(ValueError, match="target_layer_ids \\[9\\] out of range"):
        run(setup, tmp_path / "x", "--steps", 1, "--target-layer-ids", "1,9")
    with pytest.raises(ValueError, match="--gen-tokens \\(4\\) must be at least the block size \\(6\\)"):
        run(setup, tmp_path / "x", "--steps", 1, "--gen-tokens", 4)
    assert not (tmp_path / "x.work").exists(), "nothing may be written before the settings are known to be good"


def test_a_work_dir_of_other_settings_is_not_reused(setup, tmp_path):
    run(setup, tmp_path / "d", "--steps", 1)
    with pytest.raises(ValueError, match="holds answers made with other settings \\(gen_tokens\\)"):
        run(setup, tmp_path / "d", "--steps", 2, "--gen-tokens", 30)


def test_other_drafter_settings_reuse_the_answers_in_a_run_of_their_own(setup, tmp_path, monkeypatch):
    run(setup, tmp_path / "d", "--steps", 2)
    work = tmp_path / "d.work"
    shards = {p.name: p.stat().st_mtime_ns for p in (work / "shards").iterdir()}
    answered = []
    real = train_module.answer_with_features
    monkeypatch.setattr(train_module, "answer_with_features", lambda *a, **k: answered.append(1) or real(*a, **k))
    run(setup, tmp_path / "d", "--steps", 2, "--block-size", 4, "--intermediate-size", 32)
    assert answered == [], "the stored answers must be reused, not made again"
    assert {p.name: p.stat().st_mtime_ns for p in (work / "shards").iterdir()} == shards
    runs = sorted(p.name for p in (work / "runs").iterdir())
    assert len(runs) == 2 and runs[0].startswith("full-b4-") and runs[1].startswith("full-b6-")
    metas = [json.loads((work / "runs" / r / "meta.json").read_text()) for r in runs]
    assert [(m["block_size"], m["intermediate_size"]) for m in metas] == [(4, 32), (6, None)]
    run(setup, tmp_path / "d", "--steps", 3)  # back to the first settings: that run resumes, no third one
    assert len(list((work / "runs").iterdir())) == 2
    assert json.loads((work / "runs" / runs[1] / "state.json").read_text())["step"] == 3


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text", "qwen3_5", "gpt_oss"])
def test_answers_are_the_targets_greedy_words_and_features_its_layers_outputs(family):
    """Batched, left-padded answering gives each prompt what the target alone gives it: mlx-lm's greedy
    tokens (up to and including a stop token) and, at every position, the outputs of the chosen layers -- with
    sliding windows (Gemma 3's, gpt-oss's 8-token ones here), Gemma's embedding scale and recurrent layers
    (Qwen3.5's, their state frozen over the padding) as the target runs them."""
    import mlx.core as mx
    from conftest import mlx_lm_greedy

    from treeflash_mlx.target import Target
    from treeflash_mlx.train import answer_with_features

    model = tiny_target(family, seed=9)
    prompts = [[5, 9, 200, 31, 7], [44, 3], [17, 17, 90, 2, 8, 120, 64, 11]]
    ids = [0, 2]
    expected = [mlx_lm_greedy(model, p, 12) for p in prompts]
    stop = expected[1][4]  # a token the second answer reaches: it must end there, the others need not
    got = answer_with_features(model, prompts, 12, ids, {stop}, top_k=5)
    target = Target(model)
    for p, want, (tokens, plen, feats, label_ids, label_logits) in zip(prompts, expected, got):
        answer = tokens[plen:].tolist()
        cut = want.index(stop) + 1 if stop in want else len(want)
        assert plen == len(p) and answer == want[:cut]
        logits, ref = target.forward(mx.array(tokens[:-1]), target.make_cache(), ids)
        np.testing.assert_allclose(feats[:-1].astype(np.float32), np.array(ref), atol=2e-2, rtol=2e-2)
        assert not feats[-1].any(), "the last token is never fed: its features are zeros"
        # Labels: at each answer position the target's 5 most likely tokens there and their logits.
        logits = np.array(logits)[plen - 1 :]  # the logits at position i predict the token at i + 1
        assert (label_ids[:plen] == 0).all() and np.isneginf(label_logits[:plen]).all()
        for j in range(len(answer)):
            top5 = np.argsort(-logits[j])[:5]
            assert set(label_ids[plen + j].tolist()) == set(top5.tolist())
            np.testing.assert_allclose(label_logits[plen + j], logits[j][label_ids[plen + j]], atol=1e-4)
            assert label_ids[plen + j][np.argmax(label_logits[plen + j])] == answer[j], "top-1 is the greedy token"
    assert len(got[1].tokens) - got[1].prompt_len <= 5, "the second answer stops at its stop token"


def test_a_sub_vocabulary_is_the_most_frequent_answer_tokens_and_drives_training(setup, tmp_path):
    _, _, _, root = setup
    report = run(setup, tmp_path / "d", "--steps", 30, "--sub-vocab-size", 40, "--eval-every", 15)
    drafter, _ = load_drafter(tmp_path / "d")
    vocab = np.array(drafter.sub_vocab)
    work = tmp_path / "d.work"
    from treeflash_mlx.train import Corpus, sub_vocabulary

    (run_dir,) = (work / "runs").iterdir()
    answers = Corpus(work / "shards", 10**9).answer_tokens()
    counts = np.bincount(answers, minlength=256)
    assert len(vocab) == 40 and len(set(vocab.tolist())) == 40
    assert counts[vocab].min() >= np.delete(counts, vocab).max(), "a rarer token was kept over a more frequent one"
    assert (vocab == sub_vocabulary(answers, 40, 256)).all()
    curve = [json.loads(line) for line in (run_dir / "tau_curve.jsonl").read_text().splitlines()]
    assert [c["step"] for c in curve] == [15, 30]
    assert curve[0]["label_tokens"] < curve[1]["label_tokens"] == report["label_tokens"]
    first = run(setup, tmp_path / "one", "--steps", 1, "--sub-vocab-size", 40)["final_loss"]
    assert report["final_loss"] < 0.8 * first


def test_chat_prompts_go_through_the_chat_template(setup, tokenizer):
    from treeflash_mlx.loading import read_jsonl_prompts

    _, _, _, root = setup
    f = root / "chat.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n" + json.dumps({"prompt": "ab"}))
    chat, plain = read_jsonl_prompts(f, tokenizer)
    assert chat == list(tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True))
    assert plain == tokenizer.encode("ab")
    f.write_text(json.dumps({"messages": "hi"}))
    with pytest.raises(ValueError, match="chat.jsonl:1 is not a JSON object"):
        read_jsonl_prompts(f, tokenizer)


def test_prompts_are_batched_by_length_and_more_prompts_keep_the_earlier_batches():
    from treeflash_mlx.train import length_batches

    rng = np.random.default_rng(0)
    prompts = [[1] * int(n) for n in rng.integers(1, 50, size=70)]
    batches = length_batches(prompts, 4, pool=3)
    assert sorted(map(len, (p for b in batches for p in b))) == sorted(map(len, prompts))
    for b in batches:
        assert [len(p) for p in b] == sorted(len(p) for p in b)
    pooled = [sorted(len(p) for p in prompts[i : i + 12]) for i in range(0, 70, 12)]
    assert [len(p) for b in batches[:3] for p in b] == pooled[0], "a pool is its prompts sorted by length"
    more = length_batches(prompts + [[2] * 9] * 30, 4, pool=3)
    full = 70 // 12 * 3  # batches of the complete pools
    assert more[:full] == batches[:full], "only the last, partial pool may change"


def test_an_existing_out_is_replaced_only_when_asked(setup, tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "keep").write_text("mine")
    target_dir, data, prompts, _ = setup
    argv = ["--model", str(target_dir), "--data", str(data), "--out", str(out), "--steps", "1"]
    with pytest.raises(ValueError, match="already exists; pass --force"):
        train(build_parser().parse_args(argv))
    assert (out / "keep").read_text() == "mine" and not (tmp_path / "d.work").exists()
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        train(build_parser().parse_args(argv[:-4] + ["--out", str(tmp_path / "f"), "--steps", "1"]))
    with pytest.raises(ValueError, match="--eval-tokens must be at least 1"):
        train(build_parser().parse_args(argv + ["--force", "--eval-tokens", "0"]))


def test_bad_data_leaves_nothing_that_blocks_the_corrected_rerun(setup, tmp_path):
    target_dir, data, _, _ = setup
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "def f(x):"}\nnot json\n')
    argv = ["--model", str(target_dir), "--data", str(bad), "--out", str(tmp_path / "d"), "--steps", "2",
            "--block-size", "6", "--gen-tokens", "12", "--eval-prompts", "1", "--eval-tokens", "8"]
    with pytest.raises(ValueError, match="prompts.jsonl:2 is not a JSON object"):
        train(build_parser().parse_args(argv))
    assert not (tmp_path / "d.work").exists() and not (tmp_path / "d").exists()
    bad.write_text('{"prompt": "def f(x):"}\n{"prompt": "class A:"}\n')
    assert train(build_parser().parse_args(argv))["steps"] == 2


def test_a_full_disk_during_training_is_one_line_and_leaves_no_partial_files(setup, tmp_path):
    """A real write failure: the file size limit makes every write past 64 KiB fail as a full disk would."""
    import subprocess
    import sys

    from cli_helpers import ENV

    target_dir, data, prompts, _ = setup
    argv = ["--model", str(target_dir), "--data", str(data), str(prompts), "--out", str(tmp_path / "d"),
            "--block-size", "6", "--num-prompts", "12", "--prompt-tokens", "12", "--gen-tokens", "24",
            "--steps", "2", "--eval-prompts", "0"]
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))\n"
            "from treeflash_mlx.train import main\n"
            f"sys.exit(main({argv!r}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    last = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.strip()][-1]
    assert proc.returncode == 1 and last.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.startswith(("tmp-", "."))]
    assert leftovers == [] and not (tmp_path / "d").exists()


def test_the_losses_are_the_kl_from_the_targets_distribution_at_each_labelled_position():
    """The training losses, written out in numpy from the inference drafter: the block loss at depth d of the
    block rooted at a is KL(q_{a+d} || drafter), q the stored top-K logits renormalised over the sub-vocabulary;
    the head loss the same after the head, given the true token at a+d-1; depths weighted, invalid labels out."""
    import mlx.core as mx

    from conftest import tiny_drafter
    from treeflash_mlx.target import Target
    from treeflash_mlx.train import DEPTH_DECAY, losses, output_rows

    model = tiny_target("qwen3", seed=3)
    target = Target(model)
    vocab = list(range(0, 256, 2))  # a sub-vocabulary: the even ids
    drafter = tiny_drafter(model, layers=1, block_size=4, sub_vocab=vocab)
    rng = np.random.default_rng(1)
    S, T, K, B = 2, 14, 3, 4
    F = len(drafter.args.target_layer_ids) * 64
    seqs = rng.integers(0, 255, size=(S, T))
    lengths = np.array([14, 11])
    feats = rng.normal(size=(S, T, F)).astype(np.float32)
    anchors = np.array([[2, 6, 9], [3, 8, 9]])  # the last block of sequence 1 runs past its length
    ids = rng.integers(0, 256, size=(S, T, K))
    ids[0, 4] = [1, 3, 5]  # a position with no label inside the sub-vocabulary
    logits = rng.normal(size=(S, T, K)).astype(np.float32) * 3
    rows, column = output_rows(drafter, target)
    total, block, head = losses(drafter, target, rows, column, mx.array(seqs), mx.array(lengths), mx.array(feats),
                                mx.array(anchors), mx.array(ids), mx.array(logits), "full")

    W = np.array(rows)
    col = {t: i for i, t in enumerate(vocab)}
    sums = {"block": np.zeros(B - 1), "head": np.zeros(B - 1)}
    counts = np.zeros(B - 1)
    for s in range(S):
        for a in anchors[s]:
            cache = drafter.make_cache()
            drafter.append_context(mx.array(feats[s : s + 1, :a]), cache)
            block_ids = [int(seqs[s, a])] + [drafter.args.mask_token_id] * (B - 1)
            hidden = drafter(target.embed_tokens(mx.array([block_ids])), cache)[0]
            for d in range(1, B):
                p = a + d
                keep = [k for k in range(K) if int(ids[s, p, k]) in col] if p < lengths[s] else []
                if not keep:
                    continue
                z = logits[s, p, keep]
                q = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
                cols = [col[int(ids[s, p, k])] for k in keep]
                prev = target.embed_tokens(mx.array([int(seqs[s, p - 1])]))
                for name, h in (("block", hidden[d]), ("head", drafter.correct(hidden[d][None], prev)[0])):
                    out = np.array(drafter.model.norm(h)) @ W.T
                    logp = out - out.max() - np.log(np.exp(out - out.max()).sum())
                    sums[name][d - 1] += (q * (np.log(q) - logp[cols])).sum()
                counts[d - 1] += 1
    w = np.exp(-np.arange(B - 1) / DEPTH_DECAY)
    w /= w.sum()
    for name, got in (("block", block), ("head", head)):
        want = (sums[name] / np.maximum(counts, 1) * w).sum()
        np.testing.assert_allclose(float(got), want, rtol=2e-4, err_msg=name)
    np.testing.assert_allclose(float(total), float(block) + float(head), rtol=1e-6)


def test_label_top_k_1_trains_on_the_greedy_token_alone(setup, tmp_path):
    run(setup, tmp_path / "d", "--steps", 2, "--label-top-k", 1)
    corpus_dir = tmp_path / "d.work" / "shards"
    from treeflash_mlx.train import Corpus

    corpus = Corpus(corpus_dir, 10**9)
    for i in range(len(corpus)):
        s, a, n, p = corpus.rows[i]
        assert corpus.label_ids[s].shape[-1] == 1
        np.testing.assert_array_equal(corpus.label_ids[s][a + p : a + n, 0], corpus.tokens[s][a + p : a + n])
