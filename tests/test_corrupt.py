"""Corrupted checkpoints, generated here: every truncation and byte flip is exit 2 / InputError, never a crash
(exit 3) or a hang. A flip inside tensor bytes may load (nothing in the formats can tell); then it loads whole."""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import PYTHON, ROOT, assert_clean_error
from safetensors.torch import save_file

from bntool import zoo

ARCH = "bntool.zoo:MLPBN"

# Loads every file named on stdin in a fresh process and prints one JSON line per file: a hang is a timeout.
LOADER = """
import json, sys
from bntool.checkpoint import load_checkpoint
from bntool.errors import InputError
for line in sys.stdin:
    path = line.strip()
    try:
        model = load_checkpoint(path, arch=sys.argv[1]).model
        outcome = "loaded:" + ",".join(sorted(model.state_dict()))
    except InputError as e:
        outcome = "input-error:" + str(e).splitlines()[0]
    except BaseException as e:
        outcome = f"CRASH:{type(e).__name__}: {e}"
    print(json.dumps([path, outcome]), flush=True)
"""


def _originals(directory: Path) -> dict[str, Path]:
    sd = zoo.build("mlp").state_dict()
    files = {"zip": directory / "zip.pt", "legacy": directory / "legacy.pt", "wrapped": directory / "wrapped.pt",
             "safetensors": directory / "st.safetensors"}
    torch.save(sd, files["zip"])
    torch.save(sd, files["legacy"], _use_new_zipfile_serialization=False)
    torch.save({"state_dict": sd, "epoch": 3, "optimizer": {"lr": 0.1}}, files["wrapped"])
    save_file({k: v.contiguous() for k, v in sd.items()}, str(files["safetensors"]))
    return files


def _regions(kind: str, data: bytes, path: Path) -> list[int]:
    """Offsets where each structural region of the file starts (zip records; the safetensors header)."""
    marks = {0, len(data) // 2, len(data) - 1}
    if kind == "safetensors":
        header = int.from_bytes(data[:8], "little")
        marks |= {8, 9, 8 + header // 2, 8 + header - 1, 8 + header, 8 + header + 1}
    elif kind != "legacy":
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                data_start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
                marks |= {info.header_offset, info.header_offset + 14, info.header_offset + 26, data_start}
        central = data.rfind(b"PK\x01\x02", 0, data.rfind(b"PK\x05\x06"))
        marks |= {central, data.rfind(b"PK\x05\x06"), len(data) - 10}
        first_central = data.find(b"PK\x01\x02")
        marks |= {first_central, first_central + 28}
    return sorted(m for m in marks if 0 <= m < len(data))


def _variants(kind: str, path: Path) -> dict[str, tuple[bytes, bool]]:
    """name -> (bytes, must_fail). Truncations always must fail; a flip may land in tensor bytes."""
    data = path.read_bytes()
    n = len(data)
    out: dict[str, tuple[bytes, bool]] = {}
    cuts = {1 + (n - 2) * i // 24 for i in range(25)} | {m for m in _regions(kind, data, path) if m > 0}
    for cut in sorted(cuts):
        out[f"{kind}-truncated-{cut}"] = (data[:cut], True)
    spots = {(n - 1) * i // 29 for i in range(30)} | set(_regions(kind, data, path))
    for pos in sorted(spots):
        flipped = bytearray(data)
        flipped[pos] ^= 0xFF
        out[f"{kind}-flip-{pos}"] = (bytes(flipped), False)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("corpus")
    variants: dict[str, tuple[bytes, bool]] = {}
    for kind, path in _originals(directory).items():
        variants.update(_variants(kind, path))
    variants["pickle-reduce-on-empty-stack"] = (b"\x80\x02R.", True)
    variants["pickle-stop-only"] = (b"\x80\x02.", True)
    variants["zip-magic-only"] = (b"PK\x03\x04", True)
    paths = {}
    for name, (blob, _) in variants.items():
        suffix = ".safetensors" if name.startswith("safetensors") else ".pt"
        paths[name] = directory / f"{name}{suffix}"
        paths[name].write_bytes(blob)
    return variants, paths


def test_corpus_is_large_and_covers_every_kind(corpus):
    variants, _ = corpus
    assert len(variants) >= 200
    for kind in ("zip", "legacy", "wrapped", "safetensors"):
        assert sum(name.startswith(kind + "-truncated") for name in variants) >= 20
        assert sum(name.startswith(kind + "-flip") for name in variants) >= 25


def test_every_corrupted_checkpoint_is_an_input_error(corpus):
    variants, paths = corpus
    names = list(paths)
    proc = subprocess.run([PYTHON, "-c", LOADER, ARCH], input="\n".join(str(paths[n]) for n in names),
                          capture_output=True, text=True, timeout=90, cwd=ROOT, env=_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    outcomes = dict(json.loads(line) for line in proc.stdout.splitlines())
    assert len(outcomes) == len(names)
    expected_keys = ",".join(sorted(zoo.build("mlp").state_dict()))
    crashes, silent, failed = [], [], 0
    for name in names:
        outcome = outcomes[str(paths[name])]
        must_fail = variants[name][1]
        if outcome.startswith("CRASH"):
            crashes.append((name, outcome))
        elif outcome.startswith("loaded:"):
            # Only bytes inside a tensor can change without the format noticing: the model is still whole.
            if must_fail or outcome != "loaded:" + expected_keys:
                silent.append((name, outcome[:100]))
        else:
            failed += 1
            assert str(paths[name]) in outcome, outcome  # the message names the file
    assert not crashes, crashes[:5]
    assert not silent, silent[:5]
    assert failed >= sum(must for _, must in variants.values())


@pytest.mark.parametrize("name", ["pickle-reduce-on-empty-stack", "zip-truncated-1", "legacy-truncated-1",
                                  "wrapped-flip-0", "safetensors-truncated-9", "legacy-flip-0"])
def test_cli_sample_of_the_corpus(corpus, cli, tmp_path, name):
    _, paths = corpus
    path = paths.get(name) or next(p for n, p in paths.items() if n.startswith(name.rsplit("-", 1)[0]))
    out = tmp_path / "out.pt"
    assert_clean_error(cli("fold", path, "--arch", ARCH, "--input-shape", "4,20", "-o", out), contains=str(path))
    assert not out.exists()


def _env():
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _uint8(text: bytes) -> torch.Tensor:
    return torch.tensor(list(text), dtype=torch.uint8)


LAYOUTS = {
    "not json": _uint8(b"{not json"),
    "empty": _uint8(b""),
    "a list": _uint8(b"[1, 2]"),
    "null": _uint8(b"null"),
    "floats": torch.ones(3),
    "out of byte range": torch.tensor([-1, 300], dtype=torch.int64),
    "bad utf-8": _uint8(b"\xff\xfe"),
    "names not a list": _uint8(b'{"identity": 5}'),
    "names not strings": _uint8(b'{"identity": [5]}'),
    "nested lists": _uint8(b'{"identity": [["bn1"]]}'),
    "unknown layer": _uint8(b'{"identity": ["nope"]}'),
    "not a BatchNorm": _uint8(b'{"identity": ["fc1"]}'),
    "bias on a BatchNorm": _uint8(b'{"bias_added": ["bn1"]}'),
    "bias on the root": _uint8(b'{"bias_added": [""]}'),
    "unknown entry": _uint8(b'{"whatever": ["bn1"]}'),
    "centered but not affine": _uint8(b'{"centered": ["bn1"]}'),
    "structure without weights": _uint8(b'{"affine": ["bn1"]}'),  # says affine, the weights are a BN's
    "depthwise affine on a linear": _uint8(b'{"depthwise_affine": ["fc1"]}'),  # fc1 is no depthwise 1x1 conv
    "depthwise affine on nothing": _uint8(b'{"depthwise_affine": ["nope"]}'),
}


@pytest.mark.parametrize("case", list(LAYOUTS))
def test_corrupt_fold_layout_record(tmp_path, case):
    from bntool.checkpoint import load_checkpoint
    from bntool.errors import InputError
    from bntool.layout import LAYOUT_KEY

    sd = zoo.build("mlp").state_dict()
    sd[LAYOUT_KEY] = LAYOUTS[case]
    path = tmp_path / "folded.pt"
    torch.save(sd, path)
    with pytest.raises(InputError) as info:
        load_checkpoint(path, arch=ARCH)
    assert str(path) in str(info.value)


def test_corrupt_fold_layout_record_through_the_cli(tmp_path, cli):
    from bntool.layout import LAYOUT_KEY

    sd = zoo.build("mlp").state_dict()
    sd[LAYOUT_KEY] = LAYOUTS["bias on the root"]
    path = tmp_path / "folded.pt"
    torch.save(sd, path)
    assert_clean_error(cli("inspect", path, "--arch", ARCH), contains=str(path))
