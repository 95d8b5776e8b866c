//! The content round trip: `grid isolate` -> `grid show` -> `grid fetch`, and the store's
//! behaviour under bad input, damage and crashes.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use grid_tests::{NodeProc, Scratch, snapshot, suite_dir};

/// A tree with everything a materializer must restore.
fn sample_tree(s: &Scratch) {
    s.write("tree/bin/run_me", b"#!/bin/sh\necho hello\n", 0o755);
    s.write("tree/data/empty", b"", 0o644);
    s.write("tree/data/empty_exec", b"", 0o755);
    let big: Vec<u8> = (0..(1 << 20) * 3 + 4321)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    s.write("tree/data/big.bin", &big, 0o644);
    s.write("tree/a/b/c/d/deep.txt", b"deep\n", 0o600);
    s.write("tree/with space/ünïcode.txt", b"names\n", 0o644);
    std::os::unix::fs::symlink("../data/big.bin", s.path("tree/bin/big_link")).unwrap();
    std::os::unix::fs::symlink("a/b", s.path("tree/dir_link")).unwrap();
}

fn isolate_id(out: &str) -> String {
    let id = out.trim().to_string();
    assert!(id.starts_with('b') && !id.contains(char::is_whitespace), "not an id: {out:?}");
    id
}

/// Files keep content, executable bit and links; directories are recreated.
fn assert_same_tree(a: &Path, b: &Path) {
    let sa = snapshot(a);
    let sb = snapshot(b);
    assert_eq!(sa.len(), sb.len(), "different number of paths");
    for ((pa, na), (pb, nb)) in sa.iter().zip(&sb) {
        assert_eq!(pa, pb);
        assert_eq!(na, nb, "{} differs", pa.display());
    }
}

#[test]
fn isolate_show_fetch_round_trip_is_byte_identical() {
    let s = Scratch::new();
    sample_tree(&s);
    let id = isolate_id(&s.ok(["isolate", "--root", "tree", "--input", "tree"]));

    let shown: serde_json::Value = serde_json::from_str(&s.ok(["show", &id])).unwrap();
    let files = shown["files"].as_object().unwrap();
    assert_eq!(files.len(), 8, "{shown:#}");
    assert_eq!(files["bin/run_me"]["executable"], true);
    assert_eq!(files["data/big.bin"]["blocks"].as_array().unwrap().len(), 4);
    assert_eq!(files["data/empty"]["size"], 0);
    assert_eq!(files["bin/big_link"]["symlink"], "../data/big.bin");

    s.ok(["fetch", &id, "--out", "out"]);
    assert_same_tree(&s.path("tree"), &s.path("out"));
    // Inputs are hardlinked read-only, so a test cannot change the cache through them.
    let md = fs::metadata(s.path("out/data/big.bin")).unwrap();
    assert_eq!(md.permissions().mode() & 0o222, 0, "fetched files are read-only");
    use std::os::unix::fs::MetadataExt;
    assert!(md.nlink() >= 2, "fetched files are hardlinks into the cache");

    // Isolating the same tree again gives the same id without hashing anything.
    let again = s.run(["isolate", "--root", "tree", "--input", "tree"]);
    assert_eq!(isolate_id(&String::from_utf8_lossy(&again.stdout)), id);
    let note = String::from_utf8_lossy(&again.stderr);
    assert!(note.contains("0 hashed"), "{note}");
}

#[test]
fn isolate_reads_chromium_isolate_files() {
    let s = Scratch::new();
    let suite = suite_dir();
    let iso = suite.join("suite.isolate");
    let iso = iso.to_str().unwrap();
    let id = isolate_id(&s.ok(["isolate", "--isolate", iso, "--var", "OS=linux"]));
    let shown: serde_json::Value = serde_json::from_str(&s.ok(["show", &id])).unwrap();
    let files = shown["files"].as_object().unwrap();
    assert!(files.contains_key("run_tests.sh"), "{shown:#}");
    assert!(files.contains_key("platform/linux.txt"));
    assert!(!files.contains_key("platform/other.txt"), "the condition excludes it");
    assert_eq!(files["lib/assertions.sh"]["symlink"], "assert.sh");

    // The fetched tree runs: the suite's own tests check what they were given.
    s.ok(["fetch", &id, "--out", "run"]);
    let out = std::process::Command::new("sh").arg(s.path("run/run_tests.sh")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));

    // Another condition branch picks the other file.
    let other = isolate_id(&s.ok(["isolate", "--isolate", iso, "--var", "OS=mac"]));
    let shown: serde_json::Value = serde_json::from_str(&s.ok(["show", &other])).unwrap();
    assert!(shown["files"].as_object().unwrap().contains_key("platform/other.txt"));
}

#[test]
fn isolate_reads_old_chromium_trees_as_chromium_did() {
    // A 2013-style chrome/unit_tests.isolate: pre-2014 keys, and the command in an include in
    // another directory, run from there.
    let s = Scratch::new();
    s.write(
        "src/chrome/unit_tests.isolate",
        b"{
  'includes': ['../base/base.isolate'],
  'conditions': [
    ['OS==\"linux\"', {
      'variables': {
        'isolate_dependency_tracked': ['<(PRODUCT_DIR)/unit_tests'],
        'isolate_dependency_untracked': ['test/data/'],
        'isolate_dependency_touched': ['<(PRODUCT_DIR)/resources.pak'],
        'read_only': 1,
      },
    }],
  ],
}",
        0o644,
    );
    s.write(
        "src/base/base.isolate",
        b"{
  'conditions': [
    ['use_x11==1', {
      'variables': {
        'command': ['../testing/xvfb.py', '<(PRODUCT_DIR)', '<(PRODUCT_DIR)/unit_tests',
                    '--summary=${ISOLATED_OUTDIR}/out.json'],
        'isolate_dependency_tracked': ['../testing/xvfb.py'],
      },
    }],
  ],
}",
        0o644,
    );
    s.write("src/out/Release/unit_tests", b"#!/bin/sh\n", 0o755);
    s.write("src/out/Release/resources.pak", b"", 0o644);
    s.write("src/chrome/test/data/a.txt", b"a", 0o644);
    s.write("src/testing/xvfb.py", b"#!/bin/sh\n", 0o755);
    let out = s.ok([
        "isolate",
        "--isolate",
        "src/chrome/unit_tests.isolate",
        "--var",
        "OS=linux",
        "--var",
        "use_x11=01",
        "--var",
        "PRODUCT_DIR=../out/Release",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["root"].as_str().unwrap(), s.path("src").to_str().unwrap(), "{v}");
    assert_eq!(v["relative_cwd"], "base", "{v}");
    assert_eq!(v["read_only"], 1, "{v}");
    assert_eq!(
        v["command"],
        serde_json::json!([
            "../testing/xvfb.py",
            "../out/Release",
            "../out/Release/unit_tests",
            "--summary=${ISOLATED_OUTDIR}/out.json"
        ]),
        "{v}"
    );
    let shown: serde_json::Value =
        serde_json::from_str(&s.ok(["show", v["id"].as_str().unwrap()])).unwrap();
    let files: Vec<&String> = shown["files"].as_object().unwrap().keys().collect();
    assert_eq!(
        files,
        [
            "chrome/test/data/a.txt",
            "out/Release/resources.pak",
            "out/Release/unit_tests",
            "testing/xvfb.py"
        ]
    );
}

/// A 2013-style tree: chrome/unit_tests.isolate (pre-2014 keys) includes base/base.isolate,
/// whose conditions give the command.
fn old_chromium_tree(s: &Scratch) {
    s.write(
        "src/chrome/unit_tests.isolate",
        b"# Copyright (c) 2013 The Chromium Authors. All rights reserved.
{
  'includes': ['../base/base.isolate'],
  'conditions': [
    ['OS==\"linux\" or OS==\"mac\" or OS==\"win\"', {
      'variables': {
        'isolate_dependency_tracked': [
          '../testing/test_env.py',
          '<(PRODUCT_DIR)/unit_tests<(EXECUTABLE_SUFFIX)',
        ],
        'isolate_dependency_untracked': ['../net/data/', 'test/data/'],
      },
    }],
    ['OS==\"linux\"', {
      'variables': {
        'isolate_dependency_tracked': ['../testing/xvfb.py'],
        'isolate_dependency_touched': ['<(PRODUCT_DIR)/resources.pak'],
        'read_only': 1,
      },
    }],
    ['OS==\"linux\" and use_x11==1', {
      'variables': {'isolate_dependency_untracked': ['<(PRODUCT_DIR)/locales/']},
    }],
  ],
}
",
        0o644,
    );
    s.write(
        "src/base/base.isolate",
        b"{
  'conditions': [
    ['use_x11==0', {
      'variables': {
        'command': [
          '../testing/test_env.py',
          '<(PRODUCT_DIR)/unit_tests<(EXECUTABLE_SUFFIX)',
          '--test-launcher-summary-output=${ISOLATED_OUTDIR}/out.json',
        ],
      },
    }],
    ['use_x11==1', {
      'variables': {
        'command': [
          '../testing/xvfb.py',
          '<(PRODUCT_DIR)',
          '<(PRODUCT_DIR)/unit_tests<(EXECUTABLE_SUFFIX)',
        ],
        'read_only': 2,
      },
    }],
    ['OS==\"linux\" or OS==\"mac\"', {'variables': {'files': ['test/']}}],
    ['OS==\"mac\" or use_x11==1', {'variables': {'files': ['mac_or_x11.txt']}}],
    ['use_x11==1 or OS==\"mac\"', {'variables': {'files': ['x11_or_mac.txt']}}],
  ],
}
",
        0o644,
    );
    for f in [
        "out/Release/unit_tests",
        "out/Release/unit_tests.exe",
        "out/Release/resources.pak",
        "out/Release/locales/en-US.pak",
        "testing/test_env.py",
        "testing/xvfb.py",
        "chrome/test/data/a.txt",
        "base/test/b.txt",
        "base/mac_or_x11.txt",
        "base/x11_or_mac.txt",
        "net/data/c.txt",
    ] {
        s.write(&format!("src/{f}"), f.as_bytes(), 0o644);
    }
}

#[test]
fn isolate_resolves_what_chromium_s_isolate_format_resolves() {
    // Compared with Chromium's own code when it is at hand: GRID_LUCI_PY names a luci-py
    // client/ directory whose isolate_format.py still knows read_only (before October 2020).
    let Some(client) = std::env::var_os("GRID_LUCI_PY") else {
        eprintln!("skipped: set GRID_LUCI_PY to a luci-py client/ directory to compare");
        return;
    };
    let python = std::process::Command::new("python3").arg("--version").output();
    if !python.is_ok_and(|o| o.status.success()) {
        eprintln!("skipped: no python3 to run luci-py's isolate_format.py with");
        return;
    }
    let script = suite_dir().parent().unwrap().join("chromium/resolve.py");
    let s = Scratch::new();
    old_chromium_tree(&s);
    let src = s.path("src");
    for (os, x11, suffix) in [
        ("linux", "0", ""),
        ("linux", "01", ""),
        ("mac", "0", ""),
        ("win", "0", ".exe"),
        // android is named by no file: Chromium takes OS as unknown.
        ("android", "1", ""),
    ] {
        let config = serde_json::json!({ "OS": os, "use_x11": x11 }).to_string();
        let extra = serde_json::json!({ "EXECUTABLE_SUFFIX": suffix }).to_string();
        let out = std::process::Command::new("python3")
            .arg(&script)
            .arg(&client)
            .args(["chrome/unit_tests.isolate", &config, r#"{"PRODUCT_DIR": "out/Release"}"#])
            .arg(&extra)
            .current_dir(&src)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "resolve.py failed: {stderr}");
        let luci: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();

        let ours = s
            .grid([
                "isolate",
                "--isolate",
                "chrome/unit_tests.isolate",
                "--var",
                &format!("OS={os}"),
                "--var",
                &format!("use_x11={x11}"),
                "--var",
                "PRODUCT_DIR=../out/Release",
                "--var",
                &format!("EXECUTABLE_SUFFIX={suffix}"),
                "--json",
            ])
            .current_dir(&src)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&ours.stderr);
        assert!(ours.status.success(), "{os} {x11}: {stderr}");
        let v: serde_json::Value = serde_json::from_slice(&ours.stdout).unwrap();
        for field in ["command", "read_only", "root", "relative_cwd"] {
            assert_eq!(v[field], luci[field], "{os} {x11}: {field}: grid {v}, Chromium {luci}");
        }
        let shown: serde_json::Value =
            serde_json::from_str(&s.ok(["show", v["id"].as_str().unwrap()])).unwrap();
        let files: Vec<&String> = shown["files"].as_object().unwrap().keys().collect();
        let theirs: Vec<&str> =
            luci["files"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
        assert_eq!(files, theirs, "{os} {x11}");
    }
}

#[test]
fn isolate_errors_say_failed_to_isolate_once() {
    let s = Scratch::new();
    let err = s.fails(["isolate", "--input", "missing.txt"]);
    assert_eq!(err.matches("failed to isolate").count(), 1, "{err}");
    // Through a running node too.
    let node = NodeProc::start(&s.data_dir(), &[]);
    let out = node.grid(["isolate", "--input", "missing.txt"]).current_dir(s.dir.path()).output();
    let err = String::from_utf8(out.unwrap().stderr).unwrap();
    assert!(err.contains("missing.txt: no such file"), "{err}");
    assert_eq!(err.matches("failed to isolate").count(), 1, "{err}");
}

#[test]
fn bad_input_is_named_and_leaves_no_manifest() {
    let s = Scratch::new();
    s.write("ok.txt", b"ok", 0o644);
    let err = s.fails(["isolate", "--input", "ok.txt", "--input", "nope/missing.txt"]);
    assert!(err.contains("missing.txt") && err.contains("no such file"), "{err}");

    s.write("broken.isolate", b"{\n  'variables': {\n    'files': ['a' 'b'],\n  },\n}\n", 0o644);
    let err = s.fails(["isolate", "--isolate", "broken.isolate"]);
    assert!(err.contains("broken.isolate:3:19"), "syntax errors name file:line:column: {err}");

    s.write("vars.isolate", b"{'variables': {'files': ['<(PRODUCT_DIR)/x']}}", 0o644);
    let err = s.fails(["isolate", "--isolate", "vars.isolate"]);
    assert!(err.contains("PRODUCT_DIR"), "unknown variables are named: {err}");

    s.write("gone.isolate", b"{'variables': {'files': ['ok.txt', 'gone.bin']}}", 0o644);
    let err = s.fails(["isolate", "--isolate", "gone.isolate"]);
    assert!(err.contains("gone.bin"), "missing files are named: {err}");

    // None of the failures left a manifest behind.
    let report = s.ok(["verify"]);
    assert!(report.contains("0 manifests ok"), "{report}");

    let err = s.fails(["show", "not-an-id"]);
    assert!(err.contains("not-an-id"), "{err}");
}

#[test]
fn verify_drops_damaged_content_and_fetch_says_what_is_missing() {
    let s = Scratch::new();
    s.write("t/a.txt", b"alpha", 0o644);
    s.write("t/b.txt", b"bravo", 0o644);
    let id = isolate_id(&s.ok(["isolate", "--root", "t", "--input", "t"]));
    // Damage one object in the cache behind grid's back.
    let objects = s.data_dir().join("store/objects");
    let victim = fs::read_dir(&objects)
        .unwrap()
        .flat_map(|d| fs::read_dir(d.unwrap().path()).unwrap())
        .map(|f| f.unwrap().path())
        .find(|p| fs::read(p).unwrap() == b"bravo")
        .expect("object of b.txt");
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&victim, b"BRAVO").unwrap();

    let report = s.ok(["verify"]);
    assert!(report.contains("1 objects ok, 1 dropped"), "{report}");
    let err = s.fails(["fetch", &id, "--out", "o"]);
    assert!(err.contains("not in the store"), "{err}");
    // Isolating again restores it, and the same command now works.
    s.ok(["isolate", "--root", "t", "--input", "t"]);
    s.ok(["fetch", &id, "--out", "o"]);
    assert_eq!(fs::read(s.path("o/b.txt")).unwrap(), b"bravo");
}

#[test]
fn kill_9_while_storing_leaves_a_store_with_no_half_written_entry() {
    let s = Scratch::new();
    // Enough content that isolating takes a while.
    for i in 0..400 {
        let data: Vec<u8> = (0..256 * 1024).map(|j: u32| (j ^ (i * 7919)) as u8).collect();
        s.write(&format!("t/f{i:03}"), &data, 0o644);
    }
    let objects = s.data_dir().join("store/objects");
    let mut killed_mid_way = false;
    for _attempt in 0..5 {
        let mut child = s
            .grid(["isolate", "--root", "t", "--input", "t"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Wait until some objects are stored, then kill without warning.
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            let n = fs::read_dir(&objects).map(|d| d.count()).unwrap_or(0);
            if n >= 3 {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        if !status.success() {
            killed_mid_way = true;
            break;
        }
        // It finished before the kill landed; start over with a fresh store.
        fs::remove_dir_all(s.data_dir()).unwrap();
    }
    assert!(killed_mid_way, "could not kill grid isolate while it was storing");

    // The store opens, and every indexed entry is whole.
    let report = s.ok(["verify"]);
    assert!(report.contains(" 0 dropped; 0 manifests ok, 0 dropped"), "{report}");
    // Storing again completes and the tree is intact.
    let id = isolate_id(&s.ok(["isolate", "--root", "t", "--input", "t"]));
    s.ok(["fetch", &id, "--out", "o"]);
    assert_same_tree(&s.path("t"), &s.path("o"));
    assert_eq!(snapshot(&s.path("o")).len(), 400);
}
