//! Log lines about many servers at once: a rack or a network gone, a server starting in a
//! large cluster. Up to [`NAMED`] servers get a line each; more get one line naming the
//! first few, not hundreds. Callers log the lines, so each keeps its module as log target.

/// Servers named one line each up to this many at once; past it, in one line.
pub(crate) const NAMED: usize = 3;

/// The lines about `items`: one each (`each`), or past [`NAMED`] one line (`all`, given
/// their count and the `name`s of the first [`NAMED`] with how many more).
pub(crate) fn lines<T>(
    items: &[T],
    each: impl Fn(&T) -> String,
    name: impl Fn(&T) -> String,
    all: impl Fn(usize, &str) -> String,
) -> Vec<String> {
    if items.len() <= NAMED {
        return items.iter().map(each).collect();
    }
    let first: Vec<String> = items[..NAMED].iter().map(name).collect();
    vec![all(items.len(), &format!("{}, and {} more", first.join(", "), items.len() - NAMED))]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_each_up_to_three_then_one_line() {
        let say = |n: usize| {
            let items: Vec<usize> = (1..=n).collect();
            lines(
                &items,
                |i| format!("server s{i} left"),
                |i| format!("s{i}"),
                |n, named| format!("{n} servers left: {named}"),
            )
        };
        assert!(say(0).is_empty());
        assert_eq!(say(3), ["server s1 left", "server s2 left", "server s3 left"]);
        assert_eq!(say(4), ["4 servers left: s1, s2, s3, and 1 more"]);
        assert_eq!(say(1100), ["1100 servers left: s1, s2, s3, and 1097 more"]);
    }
}
