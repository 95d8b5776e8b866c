//! Names the commit grid is built from in its version (`GRID_VERSION`, read by `crate::VERSION`):
//! `0.1.0 (abc1234 2026-12-01)`, or `0.1.0 (unknown commit)` where there is no git checkout (a
//! source tarball) or no git.
//!
//! Cargo runs this again when HEAD moves: it watches HEAD, the ref HEAD names, and
//! `packed-refs`. In a linked worktree `.git` is a file naming the worktree's git directory,
//! whose HEAD is its own while its refs live in the common directory, so both directories come
//! from git itself (`rev-parse --git-dir --git-common-dir`) rather than from a guess at `.git`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git").arg("-C").arg(dir).args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}

/// Tells cargo which files move with HEAD, so a commit or checkout rebuilds the version.
fn watch(dir: &Path) -> Option<()> {
    let paths =
        git(dir, &["rev-parse", "--path-format=absolute", "--git-dir", "--git-common-dir"])?;
    let mut lines = paths.lines().map(PathBuf::from);
    let (git_dir, common) = (lines.next()?, lines.next()?);
    let head = git_dir.join("HEAD");
    println!("cargo::rerun-if-changed={}", head.display());
    if let Ok(text) = std::fs::read_to_string(&head)
        && let Some(name) = text.trim().strip_prefix("ref: ")
    {
        // A loose ref is one file; a packed one lives in packed-refs until the next commit
        // writes it loose, which the directory it goes into shows.
        let loose = common.join(name);
        let watched = if loose.exists() { loose } else { loose.parent()?.to_path_buf() };
        if watched.exists() {
            println!("cargo::rerun-if-changed={}", watched.display());
        }
    }
    let packed = common.join("packed-refs");
    if packed.exists() {
        println!("cargo::rerun-if-changed={}", packed.display());
    }
    Some(())
}

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    println!("cargo::rerun-if-changed=build.rs");
    // Only grid's own checkout: not a tarball unpacked inside some other repository.
    let ours = git(&manifest, &["ls-files", "--full-name", "Cargo.toml"]).is_some();
    let commit =
        ours.then(|| git(&manifest, &["log", "-1", "--format=%h %cs", "--abbrev=7"])).flatten();
    if commit.is_some() {
        watch(&manifest);
    }
    let commit = commit.unwrap_or_else(|| "unknown commit".to_string());
    println!("cargo::rustc-env=GRID_VERSION={version} ({commit})");
}
