//! The daemon's snapshot directory is given by its real path (issue 13, class 9), as
//! for `vm.snapshot`/`vm.restore`: a symlink as `snapshot --output-dir` or
//! `restore --input-dir` is refused at once, before any socket is bound or connected,
//! and nothing is written behind it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use test_infra::TempDir;
use test_infra::hostile;

fn daemon(args: &[&str]) -> hostile::Measured {
    let bin = Path::new(env!("CARGO_BIN_EXE_offload_daemon"));
    hostile::run_measured(Command::new(bin).args(args), Duration::from_secs(10)).unwrap()
}

#[test]
fn symlinked_snapshot_directories_are_refused() {
    let dir = TempDir::new("od-symlink").unwrap();
    let target = dir.join("target");
    std::fs::create_dir(&target).unwrap();
    let link = dir.join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let socket = dir.join("daemon.sock");
    let with_slash = format!("{}/", link.display());
    for out in [link.to_str().unwrap(), &with_slash] {
        let m = daemon(&[
            "snapshot",
            "--socket",
            socket.to_str().unwrap(),
            "--output-dir",
            out,
        ]);
        assert!(!m.status.success(), "{out}: {m:?}");
        assert!(m.stderr.contains("symbolic link"), "{out}: {}", m.stderr);
        assert!(!socket.exists(), "{out}: the socket was bound");
    }
    assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0);

    // A restore from a link to a directory (of any content) stops before reading it.
    std::fs::write(target.join("migration_config.json"), b"{}").unwrap();
    for input in [link.to_str().unwrap(), &with_slash] {
        let m = daemon(&[
            "restore",
            "--socket",
            socket.to_str().unwrap(),
            "--input-dir",
            input,
        ]);
        assert!(!m.status.success(), "{input}: {m:?}");
        assert!(
            m.stderr.contains("symbolic link") && m.stderr.contains("link"),
            "{input}: {}",
            m.stderr
        );
    }
    let m = daemon(&[
        "restore",
        "--ondemand",
        "--socket",
        socket.to_str().unwrap(),
        "--input-dir",
        link.to_str().unwrap(),
    ]);
    assert!(m.stderr.contains("symbolic link"), "{}", m.stderr);
}
