"""Test helpers shared by unit and integration tests (no fixtures here: see conftest.py)."""

from __future__ import annotations

from pathlib import Path

from ftctl.data.examples import Example, write_examples
from ftctl.demo.run import DEMO_INTENTS

# The 20 intents of the demo domain (shared/INTENTS.md), in catalog order.
INTENTS = DEMO_INTENTS


def write_jsonl(path: Path, rows: list[tuple[str, str]]) -> Path:
    """Write (text, label) rows as a JSONL data file."""
    return write_examples(path, [Example(t, lab) for t, lab in rows])


def make_tiny_model(
    out_dir: Path, labels=INTENTS, *, hidden: int = 32, layers: int = 12, seed: int = 0
) -> Path:
    """A tiny random-weight char-level BertForSequenceClassification saved as a HF directory."""
    from ftctl.model.files import save_classifier
    from ftctl.train.base import build_char_tokenizer, build_classifier, cjk_vocab

    vocab = cjk_vocab()
    tok = build_char_tokenizer(vocab)
    model = build_classifier(
        list(labels),
        len(vocab),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=2,
        intermediate_size=hidden * 2,
        seed=seed,
    )
    save_classifier(model, tok, out_dir)
    return out_dir


def patch_safetensors(path: Path, select, change) -> int:
    """Change, in place, the float32 tensors of a safetensors file whose name ``select`` accepts
    (``change(array) -> array`` of the same shape): the header and every other byte stay as
    they are, at the same offsets, as after a fine-tune with frozen layers. Returns the bytes
    of the tensors changed."""
    import json
    import struct

    import numpy as np

    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    data = np.memmap(path, dtype=np.uint8, mode="r+", offset=8 + n)
    changed = 0
    for name, meta in header.items():
        if name == "__metadata__" or meta["dtype"] != "F32" or not select(name):
            continue
        begin, end = meta["data_offsets"]
        arr = data[begin:end].view(np.float32).reshape(meta["shape"])
        arr[...] = change(np.array(arr))
        changed += end - begin
    data.flush()
    del data
    return changed


FINE_TUNED = ("bert.encoder.layer.11.", "classifier.", "bert.pooler.")  # what fine_tune_of changes


def fine_tune_of(
    src: Path, out: Path, seed: int = 7, *, from_base: bool = False, changed=FINE_TUNED
) -> tuple[Path, int]:
    """A copy of ``src`` whose top layer, pooler and head (the tensors named with a prefix in
    ``changed``) changed a little, in place (same header, same offsets), the way a fine-tune
    with frozen embeddings and lower layers changes a model; with its manifest.
    ``from_base``: the manifest names ``src`` as its base model, as `ftctl train` writes it
    (path + sha256 of its weights), so a deploy can send a tensor delta against it.
    Returns (the directory, bytes of the tensors changed)."""
    import shutil

    import numpy as np

    from ftctl.manifest import model_sha256, write_manifest

    shutil.copytree(src, out)
    (out / "manifest.json").unlink(missing_ok=True)
    rng = np.random.default_rng(seed)
    prefixes = tuple(changed)
    changed = patch_safetensors(
        out / "model.safetensors",
        lambda name: name.startswith(prefixes),
        lambda arr: arr + rng.normal(0, 1e-3, arr.shape).astype(arr.dtype),
    )
    payload: dict = {"kind": "test"}
    if from_base:
        payload["base_model"] = {"path": str(src), "sha256": model_sha256(src)}
    write_manifest(out, payload)
    return out, changed


# `python -c CHILD_RUSAGE CMD...` runs CMD as its only child, then writes the child's peak RSS,
# CPU and wall time on stderr as one line `RUSAGE {json}` (stdlib only: runs on a server's old
# python3 too). Read it back with child_rusage(stderr).
CHILD_RUSAGE = (
    "import json,resource,subprocess,sys,time;t=time.monotonic();rc=subprocess.call(sys.argv[1:]);"
    "r=resource.getrusage(resource.RUSAGE_CHILDREN);sys.stderr.write('RUSAGE '+json.dumps("
    "{'maxrss_kb':r.ru_maxrss,'cpu_s':r.ru_utime+r.ru_stime,'wall_s':time.monotonic()-t})+'\\n');"
    "sys.exit(rc)"
)


def child_rusage(stderr: str) -> dict:
    """The figures CHILD_RUSAGE wrote into ``stderr``: maxrss_kb, cpu_s, wall_s."""
    import json

    return json.loads(stderr.rsplit("RUSAGE ", 1)[1].splitlines()[0])


def damage_keeping_crc32(path: Path, tensor: str) -> tuple[int, int]:
    """Change bytes of ``tensor`` in the safetensors file ``path`` (one bit, plus 4 bytes
    computed to compensate) so that the CRC-32 of the tensor's bytes stays the same: damage
    that a tensor delta's per-range CRC-32 cannot see, only the sha256 of the whole file.
    Returns the tensor's (start, end) byte range in the file."""
    import zlib

    from ftctl.deploy.tensordelta import read_layout

    layout = read_layout(path)
    t = layout.tensors[tensor]
    start, end = layout.data_start + t.begin, layout.data_start + t.end
    n = end - start
    zero = zlib.crc32(bytes(n))

    def linear(flips: list[tuple[int, int]]) -> int:  # CRC-32 is affine: crc(x^d) = crc(x)^this
        d = bytearray(n)
        for pos, mask in flips:
            d[pos] ^= mask
        return zlib.crc32(d) ^ zero

    q, p = n // 3, n // 2  # the damaged bit, the 4 compensating bytes (offsets in the tensor)
    cols = [linear([(p + i // 8, 1 << (i % 8))]) for i in range(32)]
    want = linear([(q, 0x01)])
    rows = [(cols[i], 1 << i) for i in range(32)]  # Gaussian elimination over GF(2)
    basis: dict[int, tuple[int, int]] = {}
    for value, combo in rows:
        for bit in range(31, -1, -1):
            if not value >> bit & 1:
                continue
            if bit in basis:
                value, combo = value ^ basis[bit][0], combo ^ basis[bit][1]
            else:
                basis[bit] = (value, combo)
                break
    combo = 0
    for bit in range(31, -1, -1):
        if want >> bit & 1:
            want, combo = want ^ basis[bit][0], combo ^ basis[bit][1]
    assert want == 0, "no compensation found"
    raw = bytearray(path.read_bytes())
    before = zlib.crc32(raw[start:end])
    raw[start + q] ^= 0x01
    for i in range(32):
        if combo >> i & 1:
            raw[start + p + i // 8] ^= 1 << (i % 8)
    assert zlib.crc32(raw[start:end]) == before and raw[start:end] != path.read_bytes()[start:end]
    path.write_bytes(bytes(raw))
    return start, end
