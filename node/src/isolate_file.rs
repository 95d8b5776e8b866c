//! Turning `grid isolate` arguments (`.isolate` files, variables, plain inputs) into a root
//! directory and the paths to pack beneath it.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context as _, bail};
use grid_protocol::isolate;

/// What `.isolate` files and `--input` paths resolve to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The tree's root directory.
    pub root: PathBuf,
    /// The inputs, absolute, sorted, each once.
    pub inputs: Vec<PathBuf>,
    /// The `.isolate` file's `command`, if it gives one, as a job spec wants it: the program
    /// (relative to the root when it is a path, else a name to look up in PATH) and its
    /// arguments.
    pub command: Option<Vec<String>>,
    /// The same command as the `.isolate` file gives it (Chromium's form): every path in it
    /// relative to [`Resolved::cwd`].
    pub isolate_command: Option<Vec<String>>,
    /// The directory the command runs from, relative to the root (`""` for the root itself):
    /// Chromium's `relative_cwd`, the directory of the `.isolate` file whose command won.
    pub cwd: String,
    /// The `.isolate` file's `read_only` (0, 1 or 2), if it gives one.
    pub read_only: Option<u8>,
}

/// Resolves the inputs of `grid isolate` and `grid submit`.
///
/// Plain inputs are relative to the current directory. Paths listed in a `.isolate` file are
/// relative to its directory. The root is `root` when given, else the current directory for
/// plain inputs alone, else, as Chromium chose it, the deepest directory holding the directory
/// the command runs from (see [`isolate::Isolate::isolate_dir`]), everything the file lists,
/// the directories its path variables name, and the plain inputs' directories.
pub fn resolve(
    isolate_file: Option<&Path>,
    vars: &BTreeMap<String, String>,
    inputs: &[PathBuf],
    root: Option<&Path>,
) -> anyhow::Result<Resolved> {
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let mut paths: Vec<PathBuf> = inputs.iter().map(|p| normalize(&cwd.join(p))).collect();
    let mut default_root = cwd.clone();
    let mut command = None;
    let mut read_only = None;
    let mut run_dir = None;
    if let Some(file) = isolate_file {
        let name = file
            .to_str()
            .with_context(|| format!("{}: file names must be UTF-8", file.display()))?;
        let evaluated = isolate::evaluate_from(cwd.to_str(), name, vars, &mut |p| {
            let bytes = fs::read(cwd.join(p)).map_err(|e| e.to_string())?;
            String::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_string())
        })?;
        let dir = normalize(&cwd.join(file)).parent().map(Path::to_path_buf).unwrap_or_default();
        let isolate_dir = normalize(&dir.join(&evaluated.isolate_dir));
        default_root = isolate_dir.clone();
        run_dir = Some(isolate_dir);
        for d in &evaluated.variable_dirs {
            default_root = common_ancestor(&default_root, &normalize(&dir.join(d)));
        }
        read_only = evaluated.read_only;
        if let Some(c) = &evaluated.command {
            command = Some((normalize(&dir.join(&c.relative_cwd)), c.args.clone()));
        }
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
            // As Chromium: a directory's own place, a file's directory.
            let holder = if entry.is_dir { &abs } else { abs.parent().unwrap_or(&abs) };
            default_root = common_ancestor(&default_root, holder);
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
    let rel_str = |p: &Path| -> anyhow::Result<String> {
        Ok(p.to_str().context("paths must be UTF-8")?.to_string())
    };
    let isolate_command = command.as_ref().map(|(_, args)| args.clone());
    let (command, run_cwd) = match command {
        None => {
            // Chromium's relative_cwd, even with no command to run there.
            let cwd = match run_dir.as_deref().and_then(|d| d.strip_prefix(&root).ok()) {
                Some(rel) => rel_str(rel)?,
                None => String::new(),
            };
            (None, cwd)
        }
        Some((dir, mut args)) => {
            let rel = dir.strip_prefix(&root).with_context(|| {
                format!("the .isolate command's directory {} is outside the tree", dir.display())
            })?;
            // A program given as a path is relative to the command's directory; a job spec
            // names it relative to the tree's root.
            if let Some(program) = args.first_mut()
                && program.contains('/')
            {
                let p = normalize(&dir.join(&*program));
                let p = p.strip_prefix(&root).with_context(|| {
                    format!("the .isolate command {program:?} is outside the tree")
                })?;
                *program = format!("./{}", rel_str(p)?);
            }
            (Some(args).filter(|a| !a.is_empty()), rel_str(rel)?)
        }
    };
    Ok(Resolved { root, inputs: paths, command, isolate_command, cwd: run_cwd, read_only })
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
    fn the_isolate_command_is_made_relative_to_the_tree_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("sub")).unwrap();
        fs::create_dir_all(root.join("lib")).unwrap();
        fs::write(root.join("sub/run.sh"), "#!/bin/sh\n").unwrap();
        fs::write(root.join("lib/x"), "x").unwrap();
        fs::write(
            root.join("sub/t.isolate"),
            "{'variables': {'command': ['./run.sh', '--fast', 'python3'], \
             'files': ['run.sh', '../lib/']}}",
        )
        .unwrap();
        let file = root.join("sub/t.isolate");
        let r = resolve(Some(&file), &BTreeMap::new(), &[], None).unwrap();
        assert_eq!(r.root, normalize(root));
        assert_eq!(r.command.unwrap(), ["./sub/run.sh", "--fast", "python3"]);
        assert_eq!(r.cwd, "sub");
        // No command in the file: none.
        fs::write(&file, "{'variables': {'files': ['run.sh']}}").unwrap();
        let r = resolve(Some(&file), &BTreeMap::new(), &[], None).unwrap();
        assert_eq!((r.command, r.cwd.as_str()), (None, ""));
    }

    #[test]
    fn common_ancestors() {
        assert_eq!(common_ancestor(Path::new("/a/b/c"), Path::new("/a/b/d/e")), Path::new("/a/b"));
        assert_eq!(common_ancestor(Path::new("/a"), Path::new("/x")), Path::new("/"));
        assert_eq!(normalize(Path::new("/a/b/../c/./d")), Path::new("/a/c/d"));
    }

    #[test]
    fn an_old_chromium_tree_resolves_as_chromium_resolved_it() {
        // src/chrome/unit_tests.isolate (2013-style keys) includes src/base/base.isolate, which
        // gives the command; the build is in src/out/Release.
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        for d in ["chrome/test/data", "base", "out/Release/locales", "testing"] {
            fs::create_dir_all(src.join(d)).unwrap();
        }
        for f in [
            "out/Release/unit_tests",
            "out/Release/resources.pak",
            "out/Release/locales/en-US.pak",
            "testing/test_env.py",
            "chrome/test/data/a.txt",
            "base/base_paths.txt",
        ] {
            fs::write(src.join(f), f).unwrap();
        }
        fs::write(
            src.join("chrome/unit_tests.isolate"),
            "{
              'includes': ['../base/base.isolate'],
              'conditions': [
                ['OS==\"linux\"', {
                  'variables': {
                    'isolate_dependency_tracked': ['<(PRODUCT_DIR)/unit_tests'],
                    'isolate_dependency_untracked': ['test/data/', '<(PRODUCT_DIR)/locales/'],
                    'isolate_dependency_touched': ['<(PRODUCT_DIR)/resources.pak'],
                    'read_only': 1,
                  },
                }],
              ],
            }",
        )
        .unwrap();
        fs::write(
            src.join("base/base.isolate"),
            "{'variables': {
               'command': ['../testing/test_env.py', '<(PRODUCT_DIR)/unit_tests',
                           '--out=${ISOLATED_OUTDIR}/o.json'],
               'isolate_dependency_tracked': ['../testing/test_env.py', 'base_paths.txt'],
             }}",
        )
        .unwrap();
        let vars: BTreeMap<String, String> = [("OS", "linux"), ("PRODUCT_DIR", "../out/Release")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let r = resolve(Some(&src.join("chrome/unit_tests.isolate")), &vars, &[], None).unwrap();
        let src = normalize(&src);
        assert_eq!(r.root, src);
        let listed: Vec<String> = r
            .inputs
            .iter()
            .map(|p| p.strip_prefix(&src).unwrap().to_str().unwrap().to_string())
            .collect();
        assert_eq!(
            listed,
            [
                "base/base_paths.txt",
                "chrome/test/data",
                "out/Release/locales",
                "out/Release/resources.pak",
                "out/Release/unit_tests",
                "testing/test_env.py",
            ]
        );
        // The command is base.isolate's, run from base/, with PRODUCT_DIR from there.
        assert_eq!(r.cwd, "base");
        assert_eq!(
            r.isolate_command.unwrap(),
            [
                "../testing/test_env.py",
                "../out/Release/unit_tests",
                "--out=${ISOLATED_OUTDIR}/o.json"
            ]
        );
        assert_eq!(
            r.command.unwrap(),
            [
                "./testing/test_env.py",
                "../out/Release/unit_tests",
                "--out=${ISOLATED_OUTDIR}/o.json"
            ]
        );
        assert_eq!(r.read_only, Some(1));
    }
}
