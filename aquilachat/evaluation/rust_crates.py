"""The Rust crates HumanEval-X's Rust problems import, built once from the distribution's sources.

HumanEval-X's Rust declarations start with ``use rand::Rng; use regex::Regex; use md5;`` and
CodeGeeX compiles them in a cargo project that downloads those crates. Here nothing is downloaded:
:func:`build_rust_deps` runs ``cargo build --offline`` once per rustc version against Debian's
packaged crate sources (``librust-rand-dev``, ``librust-regex-dev``, ``librust-md5-dev``, a cargo
"directory" source), and each sample is then compiled by plain ``rustc --test`` with ``--extern``
flags to the cached rlibs (:func:`crate_tools`; used by ``languages.RustSpec``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

from .sandbox import SAFE_PATH

__all__ = ["RUST_CRATES", "RUST_CARGO_TOML", "RUST_RAND_COMPAT_TOML", "RUST_RAND_COMPAT_LIB", "DEBIAN_CARGO_REGISTRY",
           "RUST_BUILD_TIMEOUT_S", "build_rust_deps", "crate_tools"]

#: Crates the HumanEval-X Rust declarations import (``use rand::Rng; use regex::Regex; use md5;``).
#: CodeGeeX pins ``rand = "0.4"`` (Rust/50's test calls ``gen_range(low, high)``), which no current
#: distribution ships: ``rand`` is a small compatibility crate with rand 0.4's ``Rng`` on top of
#: rand 0.8. regex is built without its default "perf" features, which Debian packages separately.
RUST_CARGO_TOML = """[package]
name = "aquilachat-humaneval-rust-deps"
version = "0.1.0"
edition = "2021"

[dependencies]
rand = { path = "rand-compat", package = "aquilachat-rand-compat" }
regex = { version = "1", default-features = false, features = ["std", "unicode"] }
md5 = "0.7"
"""
RUST_RAND_COMPAT_TOML = """[package]
name = "aquilachat-rand-compat"
version = "0.4.99"
edition = "2021"

[lib]
name = "rand"
path = "src/lib.rs"

[dependencies]
rand08 = { package = "rand", version = "0.8" }
"""
RUST_RAND_COMPAT_LIB = """//! The rand 0.4 API HumanEval-X's Rust tests use (CodeGeeX pins rand = "0.4"), on rand 0.8.
pub use rand08::{distributions, random, rngs, seq, CryptoRng, Error, RngCore, SeedableRng};
pub use rand08::rngs::ThreadRng;

/// A handle to the thread-local generator.
pub fn thread_rng() -> ThreadRng {
    rand08::thread_rng()
}

/// rand 0.4's `Rng`: `gen_range(low, high)` takes two bounds (high exclusive).
pub trait Rng: rand08::Rng {
    fn gen<T>(&mut self) -> T
    where
        rand08::distributions::Standard: rand08::distributions::Distribution<T>,
    {
        rand08::Rng::gen(self)
    }
    fn gen_range<T>(&mut self, low: T, high: T) -> T
    where
        T: rand08::distributions::uniform::SampleUniform + PartialOrd,
    {
        rand08::Rng::gen_range(self, low..high)
    }
    fn gen_bool(&mut self, p: f64) -> bool {
        rand08::Rng::gen_bool(self, p)
    }
}

impl<R: rand08::Rng + ?Sized> Rng for R {}
"""
RUST_CRATES = ("rand", "regex", "md5")
#: Where Debian's librust-*-dev packages put crate sources (a cargo "directory" source).
DEBIAN_CARGO_REGISTRY = "/usr/share/cargo/registry"
RUST_BUILD_TIMEOUT_S = 1800


def _rlib(deps: Path, crate: str) -> Path | None:
    found = sorted(deps.glob(f"lib{crate}-*.rlib"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def crate_tools(rustc: str, *, cache: Path) -> dict[str, str] | str:
    """The ``-L dependency=`` directory and the rlib of each crate in :data:`RUST_CRATES`, as
    toolchain entries ``{"deps": dir, "extern:<crate>": rlib}``, or the reason there are none.

    ``$AQUILACHAT_RUST_DEPS`` names a user-built ``target/debug/deps`` (the newest
    ``lib<crate>-*.rlib`` of each crate is used); otherwise :func:`build_rust_deps` builds the
    crates once under ``cache``.
    """
    given = os.environ.get("AQUILACHAT_RUST_DEPS")
    if given:
        deps = Path(given)
        externs = {c: _rlib(deps, c) for c in RUST_CRATES}
        missing = [c for c, f in externs.items() if f is None]
        if missing:
            return f"{deps}: no lib{missing[0]}-*.rlib"
        return {"deps": str(deps), **{f"extern:{c}": str(f) for c, f in externs.items()}}
    base = build_rust_deps(rustc, root=cache)
    if isinstance(base, str):
        return base
    manifest = json.loads((base / "externs.json").read_text())
    return {"deps": manifest["deps"], **{f"extern:{c}": f for c, f in manifest["externs"].items()}}


def build_rust_deps(rustc: str, *, root: Path, registry: str | None = None) -> Path | str:
    """Build ``rand`` (the 0.4-compatible crate), ``regex`` and ``md5`` with ``rustc`` (offline,
    from Debian's packaged crate sources) once; return the directory holding ``externs.json``
    (crate -> rlib) and ``target/debug/deps``, or the reason it cannot.

    Cached per rustc version under ``root`` (:func:`aquilachat.evaluation.languages.cache_root`).
    Runs ``cargo`` in this process's identity (not sandboxed): it compiles distribution-packaged
    crates, never model output.
    """
    cargo = shutil.which("cargo", path=SAFE_PATH) or shutil.which("cargo")
    registry = registry or os.environ.get("AQUILACHAT_CARGO_REGISTRY", DEBIAN_CARGO_REGISTRY)
    reg = Path(registry)
    if cargo is None:
        return "cargo not found (needed once to build rand/regex/md5; Debian package cargo)"
    missing = [c for c in RUST_CRATES if not any(reg.glob(f"{c}-[0-9]*"))] if reg.is_dir() else list(RUST_CRATES)
    if missing:
        return (f"crate sources for {', '.join(missing)} not in {reg} (Debian packages librust-rand-dev "
                "librust-regex-dev librust-md5-dev, or set $AQUILACHAT_RUST_DEPS to prebuilt target/debug/deps)")
    try:
        vv = subprocess.run([rustc, "-vV"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{rustc} -vV failed: {exc}"
    key = hashlib.sha256((vv + RUST_CARGO_TOML + RUST_RAND_COMPAT_LIB + str(reg)).encode()).hexdigest()[:16]
    base = Path(root) / f"rust-deps-{key}"
    deps = base / "target" / "debug" / "deps"
    manifest = base / "externs.json"
    if manifest.exists():
        return base
    project = base / "project"
    for d in (project / "src", project / ".cargo", project / "rand-compat" / "src"):
        d.mkdir(parents=True, exist_ok=True)
    for d in (base.parent, base):
        os.chmod(d, 0o755)  # the sandbox users read the rlibs
    (project / "Cargo.toml").write_text(RUST_CARGO_TOML)
    (project / "src" / "main.rs").write_text("fn main() {}\n")
    (project / "rand-compat" / "Cargo.toml").write_text(RUST_RAND_COMPAT_TOML)
    (project / "rand-compat" / "src" / "lib.rs").write_text(RUST_RAND_COMPAT_LIB)
    (project / ".cargo" / "config.toml").write_text(
        f'[source.packaged]\ndirectory = "{reg}"\n[source.crates-io]\nreplace-with = "packaged"\n')
    env = {**os.environ, "RUSTC": rustc, "CARGO_HOME": str(base / "cargo-home"),
           "CARGO_TARGET_DIR": str(base / "target")}
    env.pop("RUSTUP_TOOLCHAIN", None)
    with open(base / "build.log", "w") as log:
        try:
            proc = subprocess.run([cargo, "build", "--offline", "--message-format=json"], cwd=project, env=env,
                                  stdout=subprocess.PIPE, stderr=log, timeout=RUST_BUILD_TIMEOUT_S, text=True)
        except subprocess.TimeoutExpired:
            return f"building rand/regex/md5 timed out (see {base / 'build.log'})"
    externs: dict[str, str] = {}
    compat = str((project / "rand-compat" / "Cargo.toml").resolve())
    for line in proc.stdout.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("reason") != "compiler-artifact" or msg.get("target", {}).get("name") not in RUST_CRATES:
            continue
        name = msg["target"]["name"]
        if name == "rand" and os.path.realpath(msg.get("manifest_path", "")) != compat:
            continue  # the real rand 0.8, a dependency of the compatibility crate
        rlibs = [f for f in msg.get("filenames", []) if f.endswith(".rlib")]
        if rlibs:
            externs[name] = rlibs[0]
    if proc.returncode != 0 or set(externs) != set(RUST_CRATES):
        return f"building rand/regex/md5 with {rustc} failed (see {base / 'build.log'})"
    for dirpath, dirnames, filenames in os.walk(base / "target"):
        os.chmod(dirpath, 0o755)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o644)
    manifest.write_text(json.dumps({"rustc": vv, "deps": str(deps), "externs": externs}, indent=2))
    os.chmod(manifest, 0o644)
    return base
