//! "A different model" for the trust benchmark and the verification tests, built honestly from the one model that
//! ships: a copy of the GGUF whose quantized weights in the feed-forward down-projections are
//! partly randomized. It loads and talks like a small LLM, but it is not the model whose
//! sha256 a dishonest agent running it would claim.
//!
//! Only the quantized values inside each block are touched, never the block scales, so the
//! weights stay in their normal range (no NaN or inf). The GGUF header is parsed just far
//! enough to find each tensor's type and data offset.

use std::path::Path;

use anyhow::Context;

use tokenfleet_engine::sampling::uniform;

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> anyhow::Result<&[u8]> {
        let s = self
            .bytes
            .get(self.pos..self.pos.saturating_add(n))
            .context("the GGUF ends early")?;
        self.pos += n;
        Ok(s)
    }
    fn u32(&mut self) -> anyhow::Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into()?))
    }
    fn u64(&mut self) -> anyhow::Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into()?))
    }
    fn string(&mut self) -> anyhow::Result<String> {
        let n = self.u64()? as usize;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
    /// Skips one metadata value of GGUF type `t`; returns it when it is a u32.
    fn value(&mut self, t: u32) -> anyhow::Result<Option<u32>> {
        match t {
            0 | 1 | 7 => {
                self.take(1)?;
            }
            2 | 3 => {
                self.take(2)?;
            }
            4 | 5 => return Ok(Some(self.u32()?)),
            6 => {
                self.take(4)?;
            }
            8 => {
                self.string()?;
            }
            9 => {
                let elem = self.u32()?;
                let n = self.u64()?;
                for _ in 0..n {
                    self.value(elem)?;
                }
            }
            10..=12 => {
                self.take(8)?;
            }
            other => anyhow::bail!("unknown GGUF value type {other}"),
        }
        Ok(None)
    }
}

/// (block bytes, scale bytes at the start of each block, elements per block) of the
/// quantization types whose values we perturb.
fn block_layout(ggml_type: u32) -> Option<(usize, usize, usize)> {
    match ggml_type {
        2 => Some((18, 2, 32)), // Q4_0
        3 => Some((20, 4, 32)), // Q4_1
        8 => Some((34, 2, 32)), // Q8_0
        _ => None,
    }
}

/// Copies `src` to `dst`, randomizing `fraction` of the quantized bytes of every
/// `*.ffn_down.weight` tensor. Returns the number of bytes changed.
pub fn perturbed_copy(src: &Path, dst: &Path, fraction: f64, seed: u64) -> anyhow::Result<usize> {
    let mut bytes = std::fs::read(src).with_context(|| format!("{}", src.display()))?;
    let mut r = Reader {
        bytes: &bytes,
        pos: 0,
    };
    anyhow::ensure!(r.take(4)? == b"GGUF", "not a GGUF file");
    let version = r.u32()?;
    anyhow::ensure!(version >= 2, "GGUF version {version}");
    let n_tensors = r.u64()?;
    let n_kv = r.u64()?;
    let mut alignment = 32usize;
    for _ in 0..n_kv {
        let key = r.string()?;
        let t = r.u32()?;
        let v = r.value(t)?;
        if key == "general.alignment" {
            alignment = v.context("alignment is not a u32")? as usize;
        }
    }
    let mut tensors = Vec::new();
    for _ in 0..n_tensors {
        let name = r.string()?;
        let dims = r.u32()?;
        let mut elements = 1u64;
        for _ in 0..dims {
            elements *= r.u64()?;
        }
        let ggml_type = r.u32()?;
        let offset = r.u64()? as usize;
        tensors.push((name, elements as usize, ggml_type, offset));
    }
    let data_start = r.pos.div_ceil(alignment) * alignment;
    let mut changed = 0;
    let mut draw = 0u64;
    for (name, elements, ggml_type, offset) in tensors {
        if !name.ends_with("ffn_down.weight") {
            continue;
        }
        let Some((block, scale, per_block)) = block_layout(ggml_type) else {
            continue;
        };
        let start = data_start + offset;
        anyhow::ensure!(
            start + elements / per_block * block <= bytes.len(),
            "tensor {name} runs past the end of the file"
        );
        for b in 0..elements / per_block {
            let base = start + b * block;
            for byte in &mut bytes[base + scale..base + block] {
                draw += 1;
                if uniform(seed, draw) < fraction {
                    draw += 1;
                    *byte = (uniform(seed ^ 0xFF, draw) * 256.0) as u8;
                    changed += 1;
                }
            }
        }
    }
    std::fs::write(dst, &bytes).with_context(|| format!("{}", dst.display()))?;
    Ok(changed)
}
