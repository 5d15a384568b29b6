"""Writes that fail (a full disk): every writer names its file, leaves the previous file as it was and no
temporary file behind; log.jsonl never keeps half a line. Injected (`full_disk`) and on a real tmpfs."""

import errno
import json

import numpy as np
import pytest
import torch
from safetensors import SafetensorError

from sundae.checkpoint import export, load_generator, save_checkpoint
from sundae.hourglass import PRESETS as HG
from sundae.hourglass import Hourglass
from sundae.io import atomic_write, save_torch
from sundae.runs import log_record
from sundae.tokens import write_token_folder

FULL = "No space left on device"


def _net(seed: int) -> Hourglass:
    torch.manual_seed(seed)
    return Hourglass(HG["tiny"]).eval()


def _same_weights(path, net) -> bool:
    loaded, _ = load_generator(path, ema=False)
    return all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), net.state_dict().values()))


def test_checkpoint_on_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, full_disk):
    old, new, path = _net(0), _net(1), tmp_path / "generator.pt"
    save_checkpoint(path, "generator", old.cfg, old, step=1)
    full_disk(4096)  # the new checkpoint is larger: torch's writer meets the full disk half way
    with pytest.raises(OSError) as err:
        save_checkpoint(path, "generator", new.cfg, new, step=2)
    assert err.value.errno == errno.ENOSPC
    assert str(err.value) == f"cannot write {path}: {FULL} (the file there is unchanged)"
    full_disk(None)
    assert _same_weights(path, old) and torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["generator.pt"]  # no temporary file left


def test_token_files_on_a_full_disk_name_the_file(tmp_path, full_disk):
    tokens, labels = np.zeros((4, 8, 8), np.int64), np.arange(4)
    full_disk(100)  # less than a .npy header
    with pytest.raises(OSError, match=f"^cannot write {tmp_path / 'tokens.npy'}: {FULL}$") as err:
        write_token_folder(tmp_path, tokens, labels, {"codebook_size": 64})
    assert err.value.errno == errno.ENOSPC and list(tmp_path.iterdir()) == []
    full_disk(None)
    write_token_folder(tmp_path, tokens + 3, labels, {"codebook_size": 64})
    assert np.load(tmp_path / "tokens.npy", mmap_mode="r").tolist() == (tokens + 3).tolist()


def test_export_on_a_full_disk_names_the_safetensors_file(tmp_path, monkeypatch):
    import safetensors.torch

    net = _net(0)
    save_checkpoint(tmp_path / "g.pt", "generator", net.cfg, net, ema=net.state_dict(), meta={"grid": [4, 4]})

    def disk_full(tensors, filename, metadata=None):  # what safetensors raises on ENOSPC, after a partial write
        with open(filename, "wb") as fh:
            fh.write(b"\x08\x00partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    out = tmp_path / "export"
    with pytest.raises(OSError, match=f"^cannot write {out / 'model.safetensors'}: {FULL}$") as err:
        export(tmp_path / "g.pt", out)
    assert err.value.errno == errno.ENOSPC and list(out.iterdir()) == []


def test_a_failed_log_append_leaves_no_half_line(tmp_path, full_disk):
    log = tmp_path / "log.jsonl"
    log_record(log, {"step": 1, "loss": 4.0})
    log_record(log, {"step": 2, "loss": 3.5})
    before = log.read_bytes()
    full_disk(10)  # the write is cut after 10 bytes, then the disk is full
    with pytest.raises(OSError) as err:
        log_record(log, {"step": 3, "loss": 3.25})
    assert str(err.value) == f"cannot write {log}: {FULL}" and err.value.errno == errno.ENOSPC
    assert log.read_bytes() == before  # truncated back: the 10 bytes written are gone
    full_disk(None)
    log_record(log, {"step": 4, "loss": 3.0})
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 4]


def test_other_errors_of_a_writer_pass_through_unchanged(tmp_path):
    with pytest.raises(ValueError, match="^not a full disk$"):
        atomic_write(tmp_path / "a.txt", lambda tmp: (_ for _ in ()).throw(ValueError("not a full disk")))
    with pytest.raises(Exception) as err:  # pickling a lambda: torch's or pickle's error, not an OSError
        save_torch(tmp_path / "b.pt", {"f": lambda: 0})
    assert not isinstance(err.value, OSError) and list(tmp_path.iterdir()) == []


def test_every_writer_on_a_real_full_disk(small_tmpfs):
    """The serializers' own reactions to a real ENOSPC (torch: RuntimeError "unexpected pos", safetensors:
    SafetensorError, numpy: OSError without errno) all become "cannot write PATH: No space left on device"."""
    root, net, other = small_tmpfs.path, _net(0), _net(1)
    save_checkpoint(root / "g.pt", "generator", net.cfg, net, ema=net.state_dict(), step=1)
    log_record(root / "log.jsonl", {"step": 1})
    filler = small_tmpfs.fill()
    writes = {root / "g.pt": lambda: save_checkpoint(root / "g.pt", "generator", other.cfg, other, step=2),
              root / "e" / "model.safetensors": lambda: export(root / "g.pt", root / "e"),
              root / "t" / "tokens.npy": lambda: write_token_folder(root / "t", np.zeros((64, 8, 8)), np.arange(64),
                                                                    {}),
              root / "log.jsonl": lambda: log_record(root / "log.jsonl", {"step": 2, "pad": "x" * 8192})}
    for path, write in writes.items():
        with pytest.raises(OSError) as err:
            write()
        assert err.value.errno == errno.ENOSPC and str(err.value).startswith(f"cannot write {path}: {FULL}")
    filler.unlink()
    assert _same_weights(root / "g.pt", net) and (root / "log.jsonl").read_text() == '{"step": 1}\n'
    assert sorted(p.name for p in root.rglob("*") if p.is_file()) == ["g.pt", "log.jsonl"]
