//! Installing grid as a service: the Debian package `scripts/package-deb` builds holds both
//! binaries, the systemd unit and the config, and what it installs runs. Built here from the
//! debug binaries beside the tests (a release build takes too long for a test), so it checks
//! the packaging, not the release profile. Skips, saying why, where dpkg-deb is missing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use grid_tests::{NodeProc, Scratch, bin};

fn repo() -> PathBuf {
    // The package directory as Cargo names it at run time: the build-time one may be another
    // checkout's that shared the build cache.
    let package = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf(), PathBuf::from);
    package.parent().expect("repository root").to_path_buf()
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run(c: &mut Command) -> String {
    let out: Output = c.output().unwrap_or_else(|e| panic!("{c:?}: {e}"));
    assert!(
        out.status.success(),
        "{c:?}: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds the package from the debug binaries into `s`, returns its path.
fn package(s: &Scratch) -> PathBuf {
    let binaries = bin("grid-node").parent().expect("target directory").to_path_buf();
    let out = run(Command::new(repo().join("scripts/package-deb"))
        .arg("--binaries")
        .arg(&binaries)
        .arg("--out")
        .arg(s.path("out"))
        .args(["--compression", "none"]));
    let deb = PathBuf::from(out.trim().lines().last().unwrap_or_default());
    assert!(deb.is_file(), "package-deb printed {out:?}, no package");
    assert_eq!(
        deb.file_name().and_then(|n| n.to_str()),
        Some(format!("grid-node_{}_{}.deb", env!("CARGO_PKG_VERSION"), arch()).as_str())
    );
    deb
}

fn arch() -> String {
    run(Command::new("dpkg").arg("--print-architecture")).trim().to_string()
}

#[test]
fn the_package_installs_both_binaries_a_service_for_the_grid_user_and_a_config_that_runs() {
    if !have("dpkg-deb") || !have("dpkg-shlibdeps") {
        eprintln!(
            "skipped: dpkg-deb or dpkg-shlibdeps is not installed (apt-get install dpkg-dev)"
        );
        return;
    }
    let s = Scratch::new();
    let deb = package(&s);

    // What it holds, with the modes and owners an install gets.
    let contents = run(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    for (mode, path) in [
        ("-rwxr-xr-x root/root", "./usr/bin/grid-node"),
        ("-rwxr-xr-x root/root", "./usr/bin/grid"),
        ("-rw-r--r-- root/root", "./usr/lib/systemd/system/grid-node.service"),
        ("-rw-r--r-- root/root", "./etc/grid/node.toml"),
        ("-rw-r--r-- root/root", "./usr/share/doc/grid-node/operations.md"),
    ] {
        assert!(
            contents.lines().any(|l| l.starts_with(mode) && l.ends_with(path)),
            "no {mode} {path} in:\n{contents}"
        );
    }

    // Its control fields and maintainer scripts.
    let field = |f: &str| run(Command::new("dpkg-deb").arg("--field").arg(&deb).arg(f));
    assert_eq!(field("Package").trim(), "grid-node");
    assert_eq!(field("Version").trim(), env!("CARGO_PKG_VERSION"));
    assert_eq!(field("Architecture").trim(), arch());
    let depends = field("Depends");
    for d in ["libc6", "bubblewrap", "adduser"] {
        assert!(depends.contains(d), "Depends lacks {d}: {depends}");
    }
    let info = run(Command::new("dpkg-deb").arg("--info").arg(&deb));
    for part in ["conffiles", "control", "postinst", "prerm", "postrm", "Installed-Size:"] {
        assert!(info.contains(part), "no {part} in dpkg-deb --info:\n{info}");
    }
    let control = s.path("control");
    run(Command::new("dpkg-deb").arg("--control").arg(&deb).arg(&control));
    assert_eq!(
        std::fs::read_to_string(control.join("conffiles")).unwrap(),
        "/etc/grid/node.toml\n"
    );
    for script in ["postinst", "prerm", "postrm"] {
        run(Command::new("sh").arg("-n").arg(control.join(script)));
    }
    postinst_makes_the_user_once(&s, &control.join("postinst"));

    // Unpacked: the files, the unit, the config.
    let root = s.path("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
    let unit =
        std::fs::read_to_string(root.join("usr/lib/systemd/system/grid-node.service")).unwrap();
    for line in [
        "User=grid",
        "Group=grid",
        "ExecStart=/usr/bin/grid-node --config /etc/grid/node.toml",
        "StateDirectory=grid",
        "ReadWritePaths=/var/lib/grid",
        "Delegate=yes",
        "Restart=on-failure",
        "KillMode=mixed",
        "ProtectSystem=strict",
        "ProtectHome=read-only",
        "PrivateTmp=yes",
        "WantedBy=multi-user.target",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit has no {line}:\n{unit}");
    }
    assert!(
        !unit
            .lines()
            .any(|l| l.starts_with("NoNewPrivileges=") || l.starts_with("RestrictNamespaces=")),
        "the unit would keep bubblewrap from working:\n{unit}"
    );
    let config = root.join("etc/grid/node.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(
        text.lines().any(|l| l == "data_dir = \"/var/lib/grid\""),
        "the config's data directory is not the unit's StateDirectory"
    );
    verify_unit(&s, &unit, &root);

    // The packaged binaries name the commit, as the ones they were made from.
    for b in ["grid", "grid-node"] {
        let packaged = run(Command::new(root.join("usr/bin").join(b)).arg("--version"));
        let built = run(Command::new(bin(b)).arg("--version"));
        assert_eq!(packaged, built);
        let rest = packaged
            .strip_prefix(&format!("{b} {} (", env!("CARGO_PKG_VERSION")))
            .and_then(|r| r.strip_suffix(")\n"))
            .unwrap_or_else(|| panic!("{packaged:?}"));
        assert!(
            rest == "unknown commit"
                || rest.split_once(' ').is_some_and(|(h, d)| h.len() >= 7 && d.len() == 10),
            "{packaged:?}"
        );
    }

    // The shipped config starts the packaged node (here on a scratch data directory, which
    // the command line sets over the config's), and the packaged grid talks to it.
    let data = s.path("data");
    let node = NodeProc::start_binary(
        &root.join("usr/bin/grid-node"),
        &data,
        &["--config", config.to_str().unwrap()],
    );
    let status = run(Command::new(root.join("usr/bin/grid"))
        .arg("--data-dir")
        .arg(&data)
        .args(["status", "--json"]));
    let v: serde_json::Value = serde_json::from_str(status.trim()).expect("status is JSON");
    assert_eq!(v["mesh"]["peer"].as_str(), Some(node.peer_id.as_str()), "{v}");
    assert!(node.stop().success());
    assert!(data.join("node.key").exists(), "the node used another data directory");
}

/// systemd's own check of the unit, with ExecStart pointing at the unpacked binary (it wants
/// the binary to exist); any warning fails.
fn verify_unit(s: &Scratch, unit: &str, root: &Path) {
    if !have("systemd-analyze") {
        eprintln!("skipped the unit's systemd-analyze verify: systemd-analyze is not installed");
        return;
    }
    let exe = root.join("usr/bin/grid-node");
    let dir = s.path("unit");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("grid-node.service");
    std::fs::write(&path, unit.replace("/usr/bin/grid-node", exe.to_str().unwrap())).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "systemd-analyze verify: {stderr}");
}

/// The postinst, run with stand-ins for getent, addgroup, adduser and systemctl that keep the
/// users in a file: the first configure makes the group and the user, a second one (an
/// upgrade) makes nothing again.
fn postinst_makes_the_user_once(s: &Scratch, postinst: &Path) {
    let fake = s.path("fakebin");
    let db = s.path("fake-users");
    std::fs::write(&db, "").unwrap();
    let db = db.display();
    let tool = |name: &str, body: String| {
        s.write(&format!("fakebin/{name}"), format!("#!/bin/sh\n{body}\n").as_bytes(), 0o755);
    };
    tool("getent", format!("grep -qx \"$1 $2\" {db}"));
    tool("addgroup", format!("echo \"addgroup $*\" >> {db}.log; echo \"group $3\" >> {db}"));
    tool(
        "adduser",
        format!(
            "echo \"adduser $*\" >> {db}.log; for a; do n=$a; done; echo \"passwd $n\" >> {db}"
        ),
    );
    tool("systemctl", format!("echo \"systemctl $*\" >> {db}.log"));
    let path = format!("{}:/usr/bin:/bin", fake.display());
    let configure = |old: &[&str]| {
        run(Command::new(postinst).arg("configure").args(old).env("PATH", &path));
    };
    configure(&[]);
    configure(&[env!("CARGO_PKG_VERSION")]);
    let log = std::fs::read_to_string(format!("{db}.log")).unwrap();
    let made: Vec<&str> = log.lines().filter(|l| !l.starts_with("systemctl")).collect();
    assert_eq!(
        made,
        [
            "addgroup --system --quiet grid",
            "adduser --system --quiet --ingroup grid --home /var/lib/grid --no-create-home \
             --shell /usr/sbin/nologin --gecos grid node grid"
        ],
        "{log}"
    );
}
