//! Tidy checks of the workspace's own files, run with the tests (as rust-analyzer's tidy
//! tests are): no Rust source file over [`MAX_LINES`] lines (STYLE.md: one concept per
//! file; split a longer one into modules by concept), a short ARCHITECTURE.md, and no
//! dead links between the documents.

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

/// STYLE.md: the root ARCHITECTURE.md is a map, kept short; details go to docs/INTERNALS.md.
const ARCHITECTURE_MAX_LINES: usize = 150;

#[test]
fn the_architecture_map_stays_short() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let text = std::fs::read_to_string(workspace.join("ARCHITECTURE.md")).unwrap();
    let lines = text.lines().count();
    assert!(
        lines <= ARCHITECTURE_MAX_LINES,
        "ARCHITECTURE.md has {lines} lines, over {ARCHITECTURE_MAX_LINES}: move details to docs/INTERNALS.md"
    );
}

/// The anchor GitHub gives a heading: lower case, spaces to `-`, other punctuation dropped.
fn heading_anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The links of a Markdown text to other files of the repository (`[text](path#anchor)`;
/// not web addresses), as (path, anchor).
fn local_links(text: &str) -> Vec<(String, Option<String>)> {
    let mut links = Vec::new();
    for part in text.split("](").skip(1) {
        let Some(end) = part.find(')') else { continue };
        let target = &part[..end];
        if target.contains("://") || target.starts_with("mailto:") || target.contains(' ') {
            continue;
        }
        match target.split_once('#') {
            Some((path, anchor)) => links.push((path.to_string(), Some(anchor.to_string()))),
            None => links.push((target.to_string(), None)),
        }
    }
    links
}

/// The broken links of the Markdown file `md`: files that do not exist, and anchors no
/// heading of the linked file has.
fn broken_links(md: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(md).unwrap();
    let mut broken = Vec::new();
    for (path, anchor) in local_links(&text) {
        let file = if path.is_empty() { md.to_path_buf() } else { md.parent().unwrap().join(&path) };
        if !file.exists() {
            broken.push(format!("{}: {path} does not exist", md.display()));
            continue;
        }
        let Some(anchor) = anchor else { continue };
        let target = std::fs::read_to_string(&file).unwrap_or_default();
        let headings = target.lines().filter_map(|line| line.strip_prefix('#')).map(|h| h.trim_start_matches('#'));
        if !headings.map(heading_anchor).any(|a| a == anchor) {
            broken.push(format!("{}: no heading {path}#{anchor}", md.display()));
        }
    }
    broken
}

/// Documents moved or sections renamed leave no dead link in the root's or docs/' Markdown.
#[test]
fn the_documents_links_lead_somewhere() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut broken = Vec::new();
    for dir in [workspace.to_path_buf(), workspace.join("docs")] {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|ext| ext == "md") {
                broken.extend(broken_links(&path));
            }
        }
    }
    assert!(broken.is_empty(), "broken links: {}", broken.join("; "));
}

/// The link check finds a missing file and a missing heading, and passes good links, web
/// addresses and links within the file.
#[test]
fn the_link_check_finds_missing_files_and_headings() {
    let dir = crate::util::run_dir().join("tidy-links");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("docs")).unwrap();
    std::fs::write(dir.join("docs/B.md"), "# B\n\n## The sample game\n").unwrap();
    let good = "[b](docs/B.md) [s](docs/B.md#the-sample-game) [w](https://x.org/a.md) [h](#top)\n# Top\n";
    std::fs::write(dir.join("A.md"), good).unwrap();
    assert_eq!(broken_links(&dir.join("A.md")), Vec::<String>::new());
    std::fs::write(dir.join("A.md"), "[c](docs/C.md) [s](docs/B.md#the-game)\n").unwrap();
    let broken = broken_links(&dir.join("A.md"));
    assert_eq!(broken.len(), 2, "{broken:?}");
    assert!(broken[0].ends_with("docs/C.md does not exist"), "{broken:?}");
    assert!(broken[1].ends_with("no heading docs/B.md#the-game"), "{broken:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
