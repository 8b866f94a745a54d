//! Terraform's version constraints (`~> 1.2`, `>= 1.0, < 2.0`, `!= 1.3.0`, `1.2.3`), as
//! `tfmirror warm` and `--from` read them. The `semver` crate's own syntax differs (`~1.2`
//! is not Terraform's `~> 1.2`), hence this small parser.

use semver::Version;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
    /// `~>`: the rightmost given part may grow.
    Pessimistic,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Term {
    op: Op,
    /// The version as written, missing parts as zero.
    version: Version,
    /// How many numeric parts were written (1 to 3), for `~>`.
    parts: usize,
}

/// A conjunction of terms; empty matches every release (not pre-releases).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Constraint(Vec<Term>);

impl std::str::FromStr for Constraint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut terms = Vec::new();
        for raw in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (op, rest) = [
                ("~>", Op::Pessimistic),
                (">=", Op::Ge),
                ("<=", Op::Le),
                ("!=", Op::Ne),
                ("=", Op::Eq),
                (">", Op::Gt),
                ("<", Op::Lt),
            ]
            .iter()
            .find_map(|(p, op)| raw.strip_prefix(p).map(|r| (*op, r.trim())))
            .unwrap_or((Op::Eq, raw));
            let rest = rest.strip_prefix('v').unwrap_or(rest);
            let (core, pre) = match rest.split_once('-') {
                Some((c, p)) => (c, Some(p)),
                None => (rest, None),
            };
            let nums: Vec<u64> = core
                .split('.')
                .map(|n| {
                    n.parse()
                        .map_err(|_| format!("invalid version in constraint: {raw}"))
                })
                .collect::<Result<_, _>>()?;
            if nums.is_empty() || nums.len() > 3 {
                return Err(format!("invalid version in constraint: {raw}"));
            }
            let mut version = Version::new(
                nums[0],
                *nums.get(1).unwrap_or(&0),
                *nums.get(2).unwrap_or(&0),
            );
            if let Some(p) = pre {
                version.pre = semver::Prerelease::new(p)
                    .map_err(|_| format!("invalid pre-release: {raw}"))?;
            }
            terms.push(Term {
                op,
                version,
                parts: nums.len(),
            });
        }
        Ok(Constraint(terms))
    }
}

impl Constraint {
    pub fn matches(&self, v: &Version) -> bool {
        // Pre-releases only match a term that names them exactly, as in Terraform.
        if !v.pre.is_empty() && !self.0.iter().any(|t| t.op == Op::Eq && t.version == *v) {
            return false;
        }
        self.0.iter().all(|t| t.matches(v))
    }
}

impl Term {
    fn matches(&self, v: &Version) -> bool {
        let c = &self.version;
        let core = |x: &Version| (x.major, x.minor, x.patch);
        match self.op {
            Op::Eq => v == c,
            Op::Ne => v != c,
            Op::Gt => v > c,
            Op::Ge => v >= c,
            Op::Lt => v < c,
            Op::Le => v <= c,
            Op::Pessimistic => {
                let upper = match self.parts {
                    1 | 2 => (c.major + 1, 0, 0),
                    _ => (c.major, c.minor + 1, 0),
                };
                core(v) >= core(c) && core(v) < upper
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(c: &str, v: &str) -> bool {
        c.parse::<Constraint>()
            .unwrap()
            .matches(&Version::parse(v).unwrap())
    }

    #[test]
    fn terraform_semantics() {
        assert!(ok("~> 1.2", "1.10.0"));
        assert!(!ok("~> 1.2", "2.0.0"));
        assert!(!ok("~> 1.2", "1.1.9"));
        assert!(ok("~> 1.2.3", "1.2.9"));
        assert!(!ok("~> 1.2.3", "1.3.0"));
        assert!(ok(">= 1.0, < 2.0, != 1.5.0", "1.4.0"));
        assert!(!ok(">= 1.0, < 2.0, != 1.5.0", "1.5.0"));
        assert!(ok("1.2.3", "1.2.3"));
        assert!(ok("= 1.2", "1.2.0"));
        assert!(ok("", "3.0.0"));
        assert!(!ok("", "3.0.0-rc.1"));
        assert!(ok("= 3.0.0-rc.1", "3.0.0-rc.1"));
        assert!("~> x".parse::<Constraint>().is_err());
        assert!("1.2.3.4".parse::<Constraint>().is_err());
    }
}
