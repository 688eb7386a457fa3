"""`bilevel data verify` exit codes, and the same integrity checks when training loads the cache.

0: every named set cached and matching its pins; 3: missing (the fetch command is printed) or
corrupted (the file is named); 2: an unknown name (the known ones are listed).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from bilevel.cli import main
from bilevel.data import DataVerificationError, fetch_dataset, load_dataset, read_arrays
from bilevel.data._integrity import array_digest, load_npz, save_npz
from tests.conftest import shared_data_dir

UCI = shared_data_dir() / "uci"


def _verify(capsys: pytest.CaptureFixture[str], *names: str) -> tuple[int, str]:
    code = main(["data", "verify", *names])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_exit_codes_present_missing_unknown(data_dir, capsys):
    fetch_dataset("uci_yacht", from_dir=UCI)
    assert _verify(capsys, "uci_yacht") == (0, "uci_yacht: ok (2 arrays)\n")
    code, text = _verify(capsys, "uci_yacht", "uci_energy")
    assert code == 3 and "bilevel data fetch uci_energy" in text and "uci_yacht: ok" in text
    code, text = _verify(capsys, "uci_yacht", "nosuchset")
    assert code == 2 and "unknown data set(s) nosuchset" in text and "fashion_mnist" in text
    code, text = _verify(capsys, "digits")  # generated on demand: nothing to fetch
    assert code == 0 and "digits: generated" in text


def test_byte_flipped_npz_is_exit_3_naming_the_file(data_dir, capsys):
    fetch_dataset("uci_kin8nm", from_dir=UCI)
    npz = data_dir / "uci_kin8nm" / "arrays.npz"
    raw = bytearray(npz.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    npz.write_bytes(bytes(raw))
    code, text = _verify(capsys, "uci_kin8nm")
    assert code == 3 and str(npz) in text and "Traceback" not in text
    with pytest.raises(DataVerificationError, match=r"arrays\.npz"):
        load_dataset("uci_kin8nm")  # training refuses it too


@pytest.mark.parametrize("manifest_text", ["{not json", "[]", '{"arrays": {"x": 1}}', "\xff\xfe"])
def test_bad_manifest_is_exit_3_naming_the_file(data_dir, capsys, manifest_text):
    fetch_dataset("uci_yacht", from_dir=UCI)
    (data_dir / "uci_yacht" / "manifest.json").write_text(manifest_text, encoding="latin-1")
    code, text = _verify(capsys, "uci_yacht")
    assert code == 3 and "manifest.json is not a valid manifest" in text


def test_relabelled_cache_with_regenerated_manifest_is_refused_by_the_pins(data_dir, capsys):
    """An attacker (or a bad script) that rewrites the arrays *and* the manifest is still
    caught: the converted arrays of every set with a fixed source are pinned in the code."""
    fetch_dataset("uci_yacht", from_dir=UCI)
    npz, manifest = data_dir / "uci_yacht" / "arrays.npz", data_dir / "uci_yacht" / "manifest.json"
    arrays = load_npz(npz)
    arrays["y"] = np.ascontiguousarray(arrays["y"][::-1])  # labels shuffled, shapes intact
    save_npz(npz, arrays)
    m = json.loads(manifest.read_text())
    m["arrays"]["y"]["sha256"] = array_digest(arrays["y"])
    manifest.write_text(json.dumps(m))
    code, text = _verify(capsys, "uci_yacht")
    assert code == 3 and "'y'" in text and "pinned" in text
    with pytest.raises(DataVerificationError, match="pinned"):
        read_arrays("uci_yacht")


def test_every_fixed_source_image_set_we_can_obtain_pins_its_arrays():
    from bilevel.data import REGISTRY

    for name in ("mnist", "fashion_mnist", *(n for n in REGISTRY if n.startswith("uci_"))):
        pins = REGISTRY[name].array_sha256
        assert pins and all(len(v) == 64 for v in pins.values()), name
