"""The converter: every published input layout → MLX, proven against a PyTorch reference; errors leave nothing."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import save_drafter, save_target, tiny_drafter, tiny_target
from mlx.utils import tree_flatten

torch = pytest.importorskip("torch", reason="torch is an optional test extra (pip install torch) for the reference")
from safetensors.torch import load_file, save_file  # noqa: E402
from torch_reference import TorchDrafter, build_tree  # noqa: E402

import treeflash_mlx.convert as convert_module  # noqa: E402
from treeflash_mlx.checkpoints import load_drafter  # noqa: E402
from treeflash_mlx.convert import convert, export, main  # noqa: E402
from treeflash_mlx.drafting import DraftOptions, transition_tables  # noqa: E402
from treeflash_mlx.target import Target  # noqa: E402
from treeflash_mlx.torch_pickle import load_bin  # noqa: E402
from treeflash_mlx.tree import best_first  # noqa: E402

B, M, K, TREE = 8, 6, 5, 24


def published_config(head: bool) -> dict:
    config = {
        "architectures": ["TreeFlashDraftModel" if head else "DFlashDraftModel"],
        "model_type": "qwen3", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128, "vocab_size": 256,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 4096, "attention_bias": False,
        "block_size": B, "num_target_layers": 4, "dflash_config": {"target_layer_ids": [1, 2], "mask_token_id": 255},
    }
    if head:
        config["treeflash_config"] = {"ar_approximation": "swiglu", "candidate_tokens": 16}
    return config


def random_torch_drafter(head: bool, seed: int = 0) -> TorchDrafter:
    torch.manual_seed(seed)
    model = TorchDrafter(published_config(head))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0).add_(0.1 * torch.randn_like(p))
    return model.eval()


def write_checkpoint(path: Path, model: TorchDrafter, layout: str) -> Path:
    """Write `model` as a published checkpoint: TreeFlash or DFlash keys, safetensors or .bin, maybe sharded."""
    path.mkdir(parents=True)
    config = dict(model.c)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if layout.startswith("dflash"):
        state = {k.removeprefix("model."): v for k, v in state.items()}
    if "bf16" in layout:
        state = {k: v.to(torch.bfloat16) for k, v in state.items()}
    if "rope-parameters" in layout:
        config["rope_parameters"] = {"rope_theta": config.pop("rope_theta"), "rope_type": "default"}
    if "top-level" in layout:
        config.update(config.pop("treeflash_config"))
    (path / "config.json").write_text(json.dumps(config))
    keys = sorted(state)
    shards = [keys[: len(keys) // 2], keys[len(keys) // 2 :]] if "sharded" in layout else [keys]
    ext, saver = (".bin", lambda d, f: torch.save(d, f)) if "bin" in layout else (".safetensors", save_file)
    base = "pytorch_model" if ext == ".bin" else "model"
    index = {}
    for i, part in enumerate(shards):
        name = f"{base}{ext}" if len(shards) == 1 else f"{base}-{i + 1:05d}-of-{len(shards):05d}{ext}"
        saver({k: state[k] for k in part}, str(path / name))
        index.update({k: name for k in part})
    if len(shards) > 1:
        (path / f"{base}{ext}.index.json" if ext == ".safetensors" else path / "pytorch_model.bin.index.json").write_text(
            json.dumps({"weight_map": index}))
    return path


@pytest.fixture(scope="module")
def target():
    return tiny_target("qwen3", seed=3)


def reference_outputs(model: TorchDrafter, target, features, root):
    E = torch.from_numpy(np.array(target.model.embed_tokens.weight)).double()
    W = torch.from_numpy(np.array(target.lm_head.weight)).double()
    model = model.double()
    with torch.no_grad():
        block = [root] + [255] * (B - 1)
        h = model.block(torch.from_numpy(features).double(), E[block])
        logits = model.model.norm(h) @ W.T
        tables = model.tables(h, E[root], lambda t: E[t], lambda x: x @ W.T, M, K)
    return logits.numpy(), [t.numpy() for t in tables], build_tree(root, *[t.numpy() for t in tables], TREE)


def mlx_outputs(drafter, target, features, root):
    cache = drafter.make_cache()
    drafter.append_context(mx.array(features[None].astype(np.float32)), cache)
    block = mx.array([root] + [255] * (B - 1))
    hidden = drafter(target.model.embed_tokens(block[None]), cache)[0]
    logits = np.array(target.lm_head(drafter.model.norm(hidden)))
    tables = transition_tables(drafter, Target(target), root, hidden, DraftOptions("treeflash", TREE, M, K, 1.0))
    return logits, tables


LAYOUTS = ["treeflash-safetensors", "treeflash-sharded-safetensors-rope-parameters", "treeflash-bin-top-level",
           "treeflash-sharded-bin", "dflash-safetensors", "dflash-bin-bf16"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_converted_drafter_matches_the_pytorch_reference(target, tmp_path, layout):
    head = layout.startswith("treeflash")
    model = random_torch_drafter(head)
    if "bf16" in layout:  # the reference sees the same bf16-rounded weights
        model = model.to(torch.bfloat16).float()
    src = write_checkpoint(tmp_path / "src", model, layout)
    out = convert(str(src), tmp_path / "mlx", dtype="float32")
    drafter, _ = load_drafter(out)
    assert drafter.has_head == head
    features = np.random.default_rng(0).normal(size=(9, 128))
    ref_logits, ref_tables, ref_tree = reference_outputs(model, target, features, root=17)
    logits, tables = mlx_outputs(drafter, target, features, root=17)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=1e-4)
    if head:
        np.testing.assert_array_equal(tables[0], ref_tables[0])
        np.testing.assert_allclose(tables[1], ref_tables[1], atol=1e-4, rtol=1e-4)
        np.testing.assert_array_equal(tables[2], ref_tables[2])
    else:
        np.testing.assert_array_equal(tables[0][:, 0], ref_tables[0][:, 0])
    tree = best_first(17, *tables, TREE)
    assert (tree.tokens.tolist(), tree.parents.tolist(), tree.depths.tolist()) == tuple(ref_tree)


def test_quantized_conversion_error_report(target, tmp_path, capsys):
    """Reports the logit error and the top-1 draft agreement at 8 and 4 bits (printed with -s)."""
    model = random_torch_drafter(True)
    src = write_checkpoint(tmp_path / "src", model, "treeflash-safetensors")
    full, _ = load_drafter(convert(str(src), tmp_path / "f32", dtype="float32"))
    features = np.random.default_rng(1).normal(size=(30, 128))
    rows = []
    for bits in (8, 4):
        q, _ = load_drafter(convert(str(src), tmp_path / f"q{bits}", dtype="float32", quantize=True, q_bits=bits,
                                    q_group_size=32))
        errs, agree = [], []
        for root in range(0, 250, 10):
            a, ta = mlx_outputs(full, target, features, root)
            b, tb = mlx_outputs(q, target, features, root)
            errs.append(np.abs(a - b).max() / np.abs(a).max())
            agree.append(np.mean(a.argmax(-1) == b.argmax(-1)))
        rows.append((bits, float(np.mean(errs)), float(np.mean(agree))))
    with capsys.disabled():
        for bits, err, agree in rows:
            print(f"\n{bits}-bit drafter: relative max logit error {err:.4f}, top-1 draft agreement {agree:.3f}")
    (b8, e8, a8), (b4, e4, a4) = rows
    assert e8 < e4 and a8 >= a4, "8 bits should be closer to float than 4 bits"
    assert a8 > 0.9 and e8 < 0.05


def test_export_round_trip_is_exact_and_readable_by_pytorch(target, tmp_path):
    drafter = tiny_drafter(target, block_size=B)
    mlx_dir = save_drafter(drafter, tmp_path / "mine")
    hf_dir = export(mlx_dir, tmp_path / "hf")
    reference = TorchDrafter(json.loads((hf_dir / "config.json").read_text()))
    reference.load_state_dict(load_file(str(hf_dir / "model.safetensors")))  # strict: every key, every shape
    back, _ = load_drafter(convert(str(hf_dir), tmp_path / "back"))
    a, b = dict(tree_flatten(drafter.parameters())), dict(tree_flatten(back.parameters()))
    assert a.keys() == b.keys() and all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a)


@pytest.mark.parametrize("head", [True, False])
def test_a_sub_vocabulary_survives_export_and_conversion_back(target, tmp_path, head):
    drafter = tiny_drafter(target, head=head, block_size=B, sub_vocab=[7, 1, 99, 250])
    hf_dir = export(save_drafter(drafter, tmp_path / "mine"), tmp_path / "hf")
    assert json.loads((hf_dir / "config.json").read_text())["treeflash_config"]["sub_vocab_size"] == 4
    back, _ = load_drafter(convert(str(hf_dir), tmp_path / "back"))
    a, b = dict(tree_flatten(drafter.parameters())), dict(tree_flatten(back.parameters()))
    assert a.keys() == b.keys() and all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a)
    assert back.sub_vocab.dtype == mx.int32


def test_dflash_export_uses_the_unprefixed_layout(target, tmp_path):
    hf_dir = export(save_drafter(tiny_drafter(target, head=False), tmp_path / "d"), tmp_path / "hf")
    keys = mx.load(str(hf_dir / "model.safetensors")).keys()
    assert "fc.weight" in keys and not any(k.startswith(("model.", "ar_approximation")) for k in keys)


@pytest.mark.parametrize("head", [True, False])
def test_the_dflash_layout_export_reads_back_to_the_same_backbone(target, tmp_path, head):
    drafter = tiny_drafter(target, head=head, block_size=B)
    hf_dir = export(save_drafter(drafter, tmp_path / "mine"), tmp_path / "hf", layout="dflash")
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == ["DFlashDraftModel"] and "treeflash_config" not in config
    assert config["tie_word_embeddings"] is False  # dflash-mlx requires the key
    stored = mx.load(str(hf_dir / "model.safetensors"))
    assert "fc.weight" in stored and not any(k.startswith(("model.", "ar_approximation")) for k in stored)
    back, _ = load_drafter(hf_dir)
    assert not back.has_head
    a = {k: v for k, v in tree_flatten(drafter.parameters()) if k.startswith("model.")}
    b = dict(tree_flatten(back.parameters()))
    assert a.keys() == b.keys() and all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a)
    assert back.args.to_dict() == {**drafter.args.to_dict(), "architectures": ["DFlashDraftModel"],
                                   "treeflash_config": {"ar_approximation": None, "candidate_tokens": 16}}


def test_the_dflash_layout_refuses_a_sub_vocabulary_in_one_line(target, tmp_path, capsys):
    mine = save_drafter(tiny_drafter(target, block_size=B, sub_vocab=[7, 1, 99, 250]), tmp_path / "mine")
    code = main(["--export", "--layout", "dflash", "--mlx-path", str(mine), "--hf-path", str(tmp_path / "hf")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.count("\n") == 0 and "sub-vocabulary of 4 tokens" in err, err
    assert not (tmp_path / "hf").exists()
    assert main(["--layout", "dflash", "--hf-path", str(mine), "--mlx-path", str(tmp_path / "x")]) == 1
    assert "--layout chooses what --export writes" in capsys.readouterr().err


def test_drop_sub_vocab_exports_the_same_backbone_scoring_the_whole_vocabulary(target, tmp_path, capsys):
    drafter = tiny_drafter(target, block_size=B, sub_vocab=[7, 1, 99, 250])
    mine = save_drafter(drafter, tmp_path / "mine")
    assert main(["--export", "--drop-sub-vocab", "--mlx-path", str(mine), "--hf-path", str(tmp_path / "x")]) == 1
    assert "--drop-sub-vocab goes with --layout dflash" in capsys.readouterr().err
    assert main(["--export", "--layout", "dflash", "--drop-sub-vocab", "--mlx-path", str(mine),
                 "--hf-path", str(tmp_path / "hf")]) == 0
    back, _ = load_drafter(tmp_path / "hf")
    assert "sub_vocab" not in back and back.args.sub_vocab_size is None and not back.has_head
    want = {k: v for k, v in tree_flatten(drafter.parameters()) if k.startswith("model.")}
    got = dict(tree_flatten(back.parameters()))
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(np.array(got[k]), np.array(want[k]), err_msg=k)


class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/treeflash-pwned",))


def break_src(src: Path, case: str):
    config = json.loads((src / "config.json").read_text())
    weights = mx.load(str(src / "model.safetensors"))
    if case == "missing tensor":
        weights.pop("model.fc.weight")
    elif case == "unexpected tensor":
        weights["model.layers.0.self_attn.rotary.weight"] = mx.zeros((2,))
    elif case == "mis-shaped tensor":
        weights["model.norm.weight"] = mx.zeros((63,))
    elif case == "unknown architecture":
        config["architectures"] = ["LlamaForCausalLM"]
    elif case == "missing config key":
        config.pop("num_attention_heads")
    elif case == "malicious pickle":
        (src / "model.safetensors").unlink()
        torch.save({"model.fc.weight": Evil()}, str(src / "pytorch_model.bin"))
        return
    (src / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(src / "model.safetensors"), weights)


ERRORS = {
    "missing tensor": "missing 1 tensor(s), e.g. 'model.fc.weight'",
    "unexpected tensor": "unexpected tensor(s), e.g. 'model.layers.0.self_attn.rotary.weight'",
    "mis-shaped tensor": "'model.norm.weight' has shape (63,)",
    "unknown architecture": "unknown drafter architecture ['LlamaForCausalLM']",
    "missing config key": "lacks the required key 'num_attention_heads'",
    "malicious pickle": "refusing to load 'posix.system'",
}


@pytest.mark.parametrize("case", ERRORS)
def test_bad_checkpoints_fail_in_one_line_and_leave_nothing(tmp_path, capsys, case):
    src = write_checkpoint(tmp_path / "src", random_torch_drafter(True), "treeflash-safetensors")
    break_src(src, case)
    code = main(["--hf-path", str(src), "--mlx-path", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.count("\n") == 0 and ERRORS[case] in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    assert not Path("/tmp/treeflash-pwned").exists()


def test_existing_output_needs_force(tmp_path, capsys):
    src = write_checkpoint(tmp_path / "src", random_torch_drafter(False), "dflash-safetensors")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(["--hf-path", str(src), "--mlx-path", str(tmp_path / "out")]) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    # --force replaces a previous conversion only, never a directory of other files
    assert main(["--hf-path", str(src), "--mlx-path", str(tmp_path / "out"), "--force"]) == 1
    assert "not a previous conversion" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    (tmp_path / "out" / "keep.txt").unlink()
    for _ in range(2):  # into the emptied directory, then over that conversion
        assert main(["--hf-path", str(src), "--mlx-path", str(tmp_path / "out"), "--force"]) == 0
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", "config.json", "model.safetensors"]


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failure_half_way_leaves_no_output(tmp_path, monkeypatch, failure):
    src = write_checkpoint(tmp_path / "src", random_torch_drafter(True), "treeflash-sharded-safetensors")
    real_save, calls = mx.save_safetensors, []

    def failing_save(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise failure
        return real_save(*args, **kwargs)

    monkeypatch.setattr(convert_module.mx, "save_safetensors", failing_save)
    code = main(["--hf-path", str(src), "--mlx-path", str(tmp_path / "out")])
    assert code in (1, 130) and len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_target_check_at_conversion_time(tmp_path, capsys):
    target_dir = save_target(tiny_target("qwen3", hidden=32), tmp_path / "target")
    src = write_checkpoint(tmp_path / "src", random_torch_drafter(True), "treeflash-safetensors")
    assert main(["--hf-path", str(src), "--mlx-path", str(tmp_path / "out"), "--target", str(target_dir)]) == 1
    assert "drafter does not match the target: hidden size 64 != target's 32" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_script_in_convert_dir_runs_from_a_clone(tmp_path):
    src = write_checkpoint(tmp_path / "src", random_torch_drafter(True), "treeflash-bin")
    script = Path(__file__).parents[1] / "convert" / "convert.py"
    proc = subprocess.run([sys.executable, str(script), "--hf-path", str(src), "--mlx-path", str(tmp_path / "out"),
                           "-q", "--q-bits", "8", "--q-group-size", "32"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 8}
    assert "fc.weight" in "".join(mx.load(str(tmp_path / "out" / "model.safetensors")))
    weights = mx.load(str(tmp_path / "out" / "model.safetensors"))
    assert weights["model.fc.weight"].dtype == mx.float32, "the fusion stays exact"
    assert weights["model.layers.0.mlp.up_proj.weight"].dtype == mx.uint32, "the layers are quantized"


def test_restricted_unpickler_reads_plain_state_dicts_only(tmp_path):
    state = {"a": torch.randn(3, 4), "b": torch.randn(4, 3).t(), "c": torch.randn(5).to(torch.bfloat16)}
    torch.save(state, str(tmp_path / "ok.bin"))
    out = load_bin(tmp_path / "ok.bin")
    for k, v in state.items():
        np.testing.assert_array_equal(np.array(out[k].astype(mx.float32)), v.float().numpy())
    assert out["c"].dtype == mx.bfloat16
    with zipfile.ZipFile(tmp_path / "evil.bin", "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(Evil()))
    with pytest.raises(ValueError, match="refusing to load"):
        load_bin(tmp_path / "evil.bin")


def test_a_tensor_reaching_past_its_storage_is_refused(tmp_path):
    torch.save({"w": torch.arange(4, dtype=torch.float32)}, str(tmp_path / "ok.bin"))
    with zipfile.ZipFile(tmp_path / "ok.bin") as src, zipfile.ZipFile(tmp_path / "bad.bin", "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name.endswith("data.pkl"):
                assert data.count(b"QK\x00K\x04\x85") == 1
                data = data.replace(b"QK\x00K\x04\x85", b"QK\x00K\x0c\x85")  # size 4 -> 12 over 4 elements
            dst.writestr(name, data)
    with pytest.raises(ValueError, match="reaches past the end of its storage"):
        load_bin(tmp_path / "bad.bin")
