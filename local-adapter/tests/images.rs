//! A configured image directory becomes the runner's whole root (overlay over an ID-mapped
//! lower layer), with the generated identity files.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::{Fixture, request, run, run_with, spec};

/// A tiny root filesystem: a few host programs and the libraries `ldd` names for them.
fn build_image(root: &Path) {
    let programs = [
        "/bin/bash",
        "/bin/cat",
        "/bin/ls",
        "/usr/bin/id",
        "/bin/touch",
        "/usr/bin/awk",
    ];
    let mut files: BTreeSet<PathBuf> = BTreeSet::new();
    for p in programs {
        let real = std::fs::canonicalize(p).expect("program");
        files.insert(real.clone());
        let out = std::process::Command::new("ldd")
            .arg(&real)
            .output()
            .expect("ldd");
        for word in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if word.starts_with('/') {
                files.insert(PathBuf::from(word));
                if let Ok(c) = std::fs::canonicalize(word) {
                    files.insert(c);
                }
            }
        }
    }
    // Mirror the host's top-level symlinks (`/bin -> usr/bin`, …) so every path resolves.
    for top in ["bin", "sbin", "lib", "lib32", "lib64", "libx32"] {
        let host = Path::new("/").join(top);
        if let Ok(link) = std::fs::read_link(&host) {
            std::fs::create_dir_all(root.join(link.strip_prefix("/").unwrap_or(&link))).unwrap();
            std::os::unix::fs::symlink(link, root.join(top)).unwrap();
        }
    }
    for f in &files {
        let target = root.join(f.strip_prefix("/").unwrap());
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        if std::fs::symlink_metadata(f)
            .unwrap()
            .file_type()
            .is_symlink()
        {
            let _ = std::os::unix::fs::symlink(std::fs::read_link(f).unwrap(), &target);
        } else {
            std::fs::copy(f, &target).unwrap();
        }
    }
    for p in programs {
        let real = std::fs::canonicalize(p).unwrap();
        let target = root.join(p.strip_prefix('/').unwrap());
        if std::fs::symlink_metadata(&target).is_err() {
            std::fs::create_dir_all(target.parent().unwrap()).unwrap();
            std::os::unix::fs::symlink(&real, &target).unwrap();
        }
    }
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:image root:/root:/bin/bash\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/image-release"), "tiny\n").unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_image_directory_is_the_writable_root_of_its_runners() {
    let image = tempfile::tempdir().unwrap();
    build_image(image.path());
    let f = Fixture::with(|cfg| {
        cfg.images.insert("tiny".into(), image.path().to_path_buf());
    })
    .await;
    let ex = &f.executor;
    let mut env = spec(64);
    env.image = "tiny".into();
    let r = f.runner_with(env).await;
    let o = run(ex, &r, "cat /etc/image-release; id -un; ls /").await;
    assert!(
        o.out().starts_with("tiny\r\nuser\r\n"),
        "{} {}",
        o.out(),
        o.err()
    );
    assert!(
        !o.out()
            .split_whitespace()
            .any(|w| w == "work" || w == "farm"),
        "{}",
        o.out()
    );
    let mut req = request("touch /bin/new && ls -l /bin/bash | awk '{print $3}'");
    req.privileged_execution = true;
    let o = run_with(ex, &r, req, None).await;
    assert_eq!(o.out(), "root\r\n", "{}", o.err());
    // The image itself is untouched.
    assert!(!image.path().join("bin/new").exists() && !image.path().join("usr/bin/new").exists());
    assert_eq!(
        std::fs::read_to_string(image.path().join("etc/passwd")).unwrap(),
        "root:x:0:0:image root:/root:/bin/bash\n"
    );
    f.destroy(&r).await;
}
