//! Manifests and job specs are genuine DAG-CBOR, as their ids' codec (0x71) says: an independent
//! implementation, the Python `dag-cbor` package (with `multiformats` for the CIDs), decodes
//! what grid wrote strictly, re-encodes it to the same bytes and computes the same ids.
//!
//! The packages are installed with pip into a virtual environment in cargo's target directory
//! (`CARGO_TARGET_TMPDIR`), once. Without python3, its venv module or the network, the test
//! says why and passes, unless `GRID_REQUIRE_DAG_CBOR_CHECK=1`, which makes that a failure.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use grid_protocol::content::{block_ids, manifest_id};
use grid_protocol::job::{JobSpec, Runner};
use grid_protocol::manifest::{Entry, MANIFEST_VERSION_1, Manifest};

/// The versions the check was written against.
const PACKAGES: [&str; 2] = ["dag-cbor==0.3.3", "multiformats==0.3.1.post4"];

fn file(data: &[u8], executable: bool) -> Entry {
    Entry::File { size: data.len() as u64, executable, blocks: block_ids(data) }
}

fn manifest() -> Manifest {
    let mut m = Manifest::new();
    m.entries.insert("bin/run_tests".into(), file(b"\x7fELF...", true));
    m.entries.insert("data/big.bin".into(), file(&vec![3u8; (1 << 20) + 5], false));
    m.entries.insert("data/empty".into(), file(b"", false));
    m.entries.insert("a".into(), file(b"a", false));
    m.entries.insert("latest".into(), Entry::Symlink { target: "data/big.bin".into() });
    m.entries.insert("ünïcode/ß".into(), file(b"u", false));
    m.includes.push(manifest_id(b"a base tree"));
    m
}

fn spec(tree: &Manifest) -> JobSpec {
    let mut s = JobSpec::new("bin/run_tests", tree.id(), "ci");
    s.args = vec!["--gtest_filter=*".into(), "${GRID_OUTPUT_DIR}/x".into()];
    s.env.insert("LANG".into(), "C".into());
    s.env.insert("A_LONGER_NAME".into(), "1".into());
    s.cwd = "bin".into();
    s.shards = 2;
    s.dimensions = s.dimensions.clone().with("os", &["Linux", "Debian"]);
    s.io_timeout = Duration::from_secs(60);
    s.hard_timeout = Duration::from_secs(7 * 24 * 3600);
    s.idempotent = true;
    s.outputs = vec!["out".into()];
    s.writable = vec!["data/empty".into()];
    s.runner = Some(Runner::Gtest);
    s.tests = vec![vec!["A.B".into()], vec!["C.D".into(), "C.E".into()]];
    s.validate().unwrap();
    s
}

/// A Python with the packages, or why there is none.
fn python(cache: &Path) -> Result<PathBuf, String> {
    let venv = cache.join("dag-cbor-venv");
    let py = venv.join("bin/python");
    let ready = |py: &Path| {
        Command::new(py)
            .args(["-c", "import dag_cbor, multiformats"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if ready(&py) {
        return Ok(py);
    }
    let made = Command::new("python3").args(["-m", "venv"]).arg(&venv).output();
    match made {
        Err(e) => return Err(format!("no python3 to run it with ({e})")),
        Ok(o) if !o.status.success() => {
            return Err(format!(
                "python3 -m venv failed (python3-venv missing?): {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
        Ok(_) => {}
    }
    let pip = Command::new(&py)
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
        .args(PACKAGES)
        .output()
        .map_err(|e| format!("cannot run pip: {e}"))?;
    if !pip.status.success() || !ready(&py) {
        return Err(format!(
            "pip could not install {} (no network?): {}",
            PACKAGES.join(" "),
            String::from_utf8_lossy(&pip.stderr).trim()
        ));
    }
    Ok(py)
}

#[test]
fn an_independent_strict_dag_cbor_decoder_reads_manifests_and_job_specs_and_agrees_on_their_ids() {
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let py = match python(cache) {
        Ok(py) => py,
        Err(why) if std::env::var("GRID_REQUIRE_DAG_CBOR_CHECK").as_deref() != Ok("1") => {
            eprintln!("SKIPPED: the independent DAG-CBOR check cannot run: {why}");
            return;
        }
        Err(why) => panic!("the independent DAG-CBOR check cannot run: {why}"),
    };
    let dir = cache.join("dag-cbor-docs");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let tree = manifest();
    let job = spec(&tree);
    let mut minimal = JobSpec::new("t", Manifest::new().id(), "p");
    minimal.shards = 1;
    let docs = [
        ("manifest", tree.encode(), tree.id()),
        ("manifest-empty", Manifest::new().encode(), Manifest::new().id()),
        ("spec", job.encode(), job.id()),
        ("spec-minimal", minimal.encode(), minimal.id()),
    ];
    for (name, bytes, id) in &docs {
        std::fs::write(dir.join(format!("{name}.bin")), bytes).unwrap();
        std::fs::write(dir.join(format!("{name}.id")), id.to_string()).unwrap();
    }
    // The first manifest format, which the codec 0x71 misnamed: a strict decoder must refuse it,
    // or this test could not tell DAG-CBOR from anything else.
    let mut legacy = tree.clone();
    legacy.version = MANIFEST_VERSION_1;
    std::fs::write(dir.join("legacy-manifest.bin"), legacy.encode()).unwrap();

    // Cargo names the package directory at run time too; the build-time one may be another
    // checkout's that shared the build cache.
    let package = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf(), PathBuf::from);
    let script = package.join("tests/dag_cbor_check.py");
    let out = Command::new(&py).arg(&script).arg(&dir).output().expect("run the check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the independent DAG-CBOR check failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every content id came out as a link: the manifest's 5 blocks and 1 include, the spec's
    // input tree.
    for (name, bytes, id) in &docs {
        let links = match *name {
            "manifest" => "links=6 codecs=['dag-cbor', 'raw']",
            "spec" | "spec-minimal" => "links=1 codecs=['dag-cbor']",
            _ => "links=0",
        };
        let line = format!("{name} {id} {links}");
        assert!(stdout.lines().any(|l| l.starts_with(&line)), "{line:?} in:\n{stdout}");
        assert!(!bytes.is_empty());
    }
    assert!(stdout.contains("legacy-manifest refused"), "{stdout}");
    assert!(stdout.contains("not in canonical order"), "refused for its key order: {stdout}");
}
