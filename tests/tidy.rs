//! Tidy checks of the workspace's own files, run with the tests (as rust-analyzer's tidy
//! tests are): no Rust source file over [`MAX_LINES`] lines (STYLE.md: one concept per
//! file; split a longer one into modules by concept).

use std::path::{Path, PathBuf};

/// STYLE.md's hard cap on a Rust file's length.
const MAX_LINES: usize = 600;

/// Directories never looked into: build output, installed npm packages, git's own.
const SKIPPED: [&str; 3] = ["target", "node_modules", ".git"];

/// The `.rs` files under `dir` (skipping [`SKIPPED`]) longer than `max` lines, with their
/// length, sorted by path.
fn long_files(dir: &Path, max: usize) -> Vec<(PathBuf, usize)> {
    let mut long = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()));
        for entry in entries {
            let entry = entry.unwrap();
            let (path, kind) = (entry.path(), entry.file_type().unwrap());
            let name = entry.file_name();
            if kind.is_dir() && !SKIPPED.iter().any(|skipped| name == *skipped) {
                dirs.push(path);
            } else if kind.is_file() && path.extension().is_some_and(|ext| ext == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                let lines = text.lines().count();
                if lines > max {
                    long.push((path, lines));
                }
            }
        }
    }
    long.sort();
    long
}

#[test]
fn no_rust_file_is_over_the_line_cap() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let long = long_files(workspace, MAX_LINES);
    let list: Vec<String> = long.iter().map(|(path, n)| format!("{} ({n} lines)", path.display())).collect();
    assert!(list.is_empty(), "over {MAX_LINES} lines, split by concept (STYLE.md): {}", list.join(", "));
}

/// The check finds a file one line over the cap, in a subdirectory, and leaves alone one at
/// the cap, files of other kinds and what the skipped directories hold.
#[test]
fn the_line_cap_check_finds_long_files_only_where_it_looks() {
    let dir = crate::util::run_dir().join("tidy");
    let _ = std::fs::remove_dir_all(&dir);
    let write = |path: &str, lines: usize| {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, "x\n".repeat(lines)).unwrap();
    };
    write("src/deep/long.rs", 11);
    write("src/at_cap.rs", 10);
    write("notes.md", 50);
    write("target/debug/build/generated.rs", 50);
    write("tests/node/node_modules/x/y.rs", 50);
    let long = long_files(&dir, 10);
    assert_eq!(long, vec![(dir.join("src/deep/long.rs"), 11)]);
    std::fs::remove_dir_all(&dir).unwrap();
}
