//! Turning `grid isolate` arguments (`.isolate` files, variables, plain inputs) into a root
//! directory and the paths to pack beneath it.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context as _, bail};
use grid_protocol::isolate;

/// Resolves the inputs of `grid isolate` to `(root, absolute input paths)`.
///
/// Plain inputs are relative to the current directory. Paths listed in a `.isolate` file are
/// relative to its directory. The root is `root` when given, else the current directory for
/// plain inputs alone, else the deepest directory holding the `.isolate` file and everything it
/// lists.
pub fn resolve_inputs(
    isolate_file: Option<&Path>,
    vars: &BTreeMap<String, String>,
    inputs: &[PathBuf],
    root: Option<&Path>,
) -> anyhow::Result<(PathBuf, Vec<PathBuf>)> {
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let mut paths: Vec<PathBuf> = inputs.iter().map(|p| normalize(&cwd.join(p))).collect();
    let mut default_root = cwd.clone();
    if let Some(file) = isolate_file {
        let name = file
            .to_str()
            .with_context(|| format!("{}: file names must be UTF-8", file.display()))?;
        let evaluated = isolate::evaluate(name, vars, &mut |p| {
            let bytes = fs::read(cwd.join(p)).map_err(|e| e.to_string())?;
            String::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_string())
        })?;
        let dir = normalize(&cwd.join(file)).parent().map(Path::to_path_buf).unwrap_or_default();
        default_root = dir.clone();
        for entry in &evaluated.files {
            let abs = normalize(&dir.join(&entry.path));
            match fs::metadata(&abs) {
                Ok(md) if md.is_dir() && !entry.is_dir => bail!(
                    "{name}: {:?} is a directory; list it as {:?} to include all of it",
                    entry.path,
                    format!("{}/", entry.path)
                ),
                Ok(md) if !md.is_dir() && entry.is_dir => {
                    bail!("{name}: {:?} is listed as a directory but is a file", entry.path)
                }
                _ => {}
            }
            default_root = common_ancestor(&default_root, abs.parent().unwrap_or(&abs));
            paths.push(abs);
        }
        if !inputs.is_empty() {
            default_root = paths
                .iter()
                .fold(default_root, |r, p| common_ancestor(&r, p.parent().unwrap_or(p)));
        }
    }
    let root = root.map(|r| normalize(&cwd.join(r))).unwrap_or(default_root);
    paths.sort();
    paths.dedup();
    Ok((root, paths))
}

/// `p` with `.` and `..` folded lexically.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

fn common_ancestor(a: &Path, b: &Path) -> PathBuf {
    a.components().zip(b.components()).take_while(|(x, y)| x == y).map(|(x, _)| x).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_ancestors() {
        assert_eq!(common_ancestor(Path::new("/a/b/c"), Path::new("/a/b/d/e")), Path::new("/a/b"));
        assert_eq!(common_ancestor(Path::new("/a"), Path::new("/x")), Path::new("/"));
        assert_eq!(normalize(Path::new("/a/b/../c/./d")), Path::new("/a/c/d"));
    }
}
