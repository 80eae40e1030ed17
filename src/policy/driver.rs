//! The `nft` process: writing a transaction, checking one without writing it
//! (`nft -c`), and listing our table to tell whether it is intact.

use super::compile::Desired;
use super::nft;
use crate::firewall::run::{run_for, run_with};

/// Counter values change with traffic; a listing without them says what the table holds.
pub fn without_counters(listing: &str) -> String {
    listing
        .lines()
        .map(|l| match l.find("counter packets") {
            Some(i) => {
                let rest = &l[i..];
                // "counter packets N bytes M" → "counter"
                let words: Vec<&str> = rest.split_whitespace().collect();
                format!(
                    "{}counter {}",
                    &l[..i],
                    words.get(5..).map(|w| w.join(" ")).unwrap_or_default()
                )
            }
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// What `nft -t` (sets without their elements) lists for our table, counters left out.
pub async fn listing() -> Option<String> {
    match run_for("nft", &["-t", "list", "table", "inet", nft::TABLE]).await {
        Ok((true, out)) => Some(without_counters(&out)),
        _ => None,
    }
}

/// Makes the kernel hold `want`: the difference to `applied` (what we last
/// wrote, when the table is known intact), else the whole table.
pub async fn apply(want: &Desired, applied: Option<&Desired>) -> anyhow::Result<()> {
    let script = match applied {
        Some(old) => nft::delta(old, want),
        None => nft::full(want),
    };
    tracing::debug!("network policy: {} nft commands", script.lines().count());
    if !script.is_empty() {
        let (ok, err) = run_with("nft", &["-f", "-"], Some(&script)).await?;
        if !ok {
            let head: String = script.lines().take(20).collect::<Vec<_>>().join("\n");
            anyhow::bail!("nft -f: {}\n{head}", err.trim());
        }
    }
    Ok(())
}

/// Whether nft would accept `want` as the whole table (`nft -c`: checked by
/// the kernel, nothing written); Err only if nft cannot be run.
pub async fn accepts(want: &Desired) -> anyhow::Result<bool> {
    let (ok, _) = run_with("nft", &["-c", "-f", "-"], Some(&nft::full(want))).await?;
    Ok(ok)
}
