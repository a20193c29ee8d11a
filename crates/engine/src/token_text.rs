//! Turning a stream of token ids into released text: UTF-8 reassembly and stop strings.
//!
//! [`TokenTable`] holds every token's piece (the bytes llama.cpp gives it, special tokens
//! omitted) and the end-of-generation ids. The engine's worker and the coordinator read pieces
//! from the same table type through the same [`TextReleaser`], so the text a client gets from
//! the coordinator is, by construction, what an honest agent released: the coordinator does
//! not have to trust a node's texts (issue 13).
//!
//! The text released after each token is a pure function of the token ids so far and the stop
//! strings. That is what makes resume exact: a vehicle that continues another vehicle's
//! generation replays the already-generated ids through a fresh [`TextReleaser`] (without
//! emitting) and then releases exactly the text the first vehicle would have released next.

use std::sync::Arc;

use crate::sampling::TokenId;

/// Every token's piece and which tokens end a generation, read once from a model's vocabulary.
/// Pure data (no llama.cpp handle): cheap to share across threads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenTable {
    pieces: Vec<Box<[u8]>>,
    eog: Vec<TokenId>,
}

impl TokenTable {
    /// A table from pieces indexed by token id and the end-of-generation ids.
    pub fn new(pieces: Vec<Box<[u8]>>, eog: Vec<TokenId>) -> Arc<Self> {
        Arc::new(Self { pieces, eog })
    }

    pub fn n_vocab(&self) -> usize {
        self.pieces.len()
    }

    /// The bytes of token `id`; None when `id` is not in the vocabulary.
    pub fn piece(&self, id: TokenId) -> Option<&[u8]> {
        usize::try_from(id)
            .ok()
            .and_then(|i| self.pieces.get(i))
            .map(|p| &p[..])
    }

    pub fn is_eog(&self, id: TokenId) -> bool {
        self.eog.contains(&id)
    }

    pub fn eog_tokens(&self) -> &[TokenId] {
        &self.eog
    }

    /// The text of one token on its own (as top-logprob alternatives are shown).
    pub fn lossy_text(&self, id: TokenId) -> String {
        String::from_utf8_lossy(self.piece(id).unwrap_or_default()).into_owned()
    }
}

/// What happened to the text after one more token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Release {
    /// Text safe to show now (may be empty: an incomplete UTF-8 sequence, or a possible stop
    /// string prefix, is held back).
    Text(String),
    /// A stop string matched: the text before it (not yet released) is released and the
    /// generation ends. The stop string itself is not part of the output.
    Stopped(String),
}

/// Incremental detokenizer with stop-string hold-back.
#[derive(Debug, Clone)]
pub struct TextReleaser {
    stop: Vec<String>,
    max_stop_len: usize,
    /// Bytes not yet forming complete UTF-8.
    pending_bytes: Vec<u8>,
    /// Decoded text not yet released (held back because it may begin a stop string).
    held: String,
}

impl TextReleaser {
    pub fn new(stop: &[String]) -> Self {
        let stop: Vec<String> = stop.iter().filter(|s| !s.is_empty()).cloned().collect();
        let max_stop_len = stop.iter().map(String::len).max().unwrap_or(0);
        Self {
            stop,
            max_stop_len,
            pending_bytes: Vec::new(),
            held: String::new(),
        }
    }

    /// Feeds the bytes of one token's piece.
    pub fn push(&mut self, piece: &[u8]) -> Release {
        self.pending_bytes.extend_from_slice(piece);
        let decoded = take_utf8_prefix(&mut self.pending_bytes);
        let search_from = self
            .held
            .len()
            .saturating_sub(self.max_stop_len.saturating_sub(1));
        self.held.push_str(&decoded);
        if let Some(pos) = self.find_stop(search_from) {
            let text = self.held[..pos].to_string();
            self.held.clear();
            return Release::Stopped(text);
        }
        let keep = self.longest_stop_prefix_suffix();
        let cut = self.held.len() - keep;
        let text = self.held[..cut].to_string();
        self.held.drain(..cut);
        Release::Text(text)
    }

    /// Releases whatever is held back at the end of a generation that did not stop on a stop
    /// string (an incomplete UTF-8 tail becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let mut out = std::mem::take(&mut self.held);
        if !self.pending_bytes.is_empty() {
            out.push_str(&String::from_utf8_lossy(&self.pending_bytes));
            self.pending_bytes.clear();
        }
        out
    }

    fn find_stop(&self, from: usize) -> Option<usize> {
        let from = floor_char_boundary(&self.held, from);
        self.stop
            .iter()
            .filter_map(|s| self.held[from..].find(s.as_str()).map(|p| p + from))
            .min()
    }

    /// Length in bytes of the longest suffix of `held` that is a proper prefix of a stop string.
    fn longest_stop_prefix_suffix(&self) -> usize {
        let mut best = 0;
        for stop in &self.stop {
            let max = stop.len().saturating_sub(1).min(self.held.len());
            for len in (best + 1..=max).rev() {
                let start = self.held.len() - len;
                if self.held.is_char_boundary(start) && stop.starts_with(&self.held[start..]) {
                    best = len;
                    break;
                }
            }
        }
        best
    }
}

/// Removes and returns the longest valid UTF-8 prefix of `bytes`; bytes that can never become
/// valid (not merely incomplete) are replaced by U+FFFD so the stream keeps moving.
fn take_utf8_prefix(bytes: &mut Vec<u8>) -> String {
    let mut out = String::new();
    loop {
        match std::str::from_utf8(bytes) {
            Ok(s) => {
                out.push_str(s);
                bytes.clear();
                return out;
            }
            Err(e) => {
                let valid = e.valid_up_to();
                // The prefix was just validated by from_utf8.
                out.push_str(&String::from_utf8_lossy(&bytes[..valid]));
                match e.error_len() {
                    None => {
                        bytes.drain(..valid);
                        return out;
                    }
                    Some(bad) => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        bytes.drain(..valid + bad);
                    }
                }
            }
        }
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stop: &[&str], pieces: &[&[u8]]) -> (Vec<Release>, String) {
        let stop: Vec<String> = stop.iter().map(|s| s.to_string()).collect();
        let mut r = TextReleaser::new(&stop);
        let out: Vec<Release> = pieces.iter().map(|p| r.push(p)).collect();
        let tail = r.finish();
        (out, tail)
    }

    #[test]
    fn plain_text_is_released_immediately() {
        let (out, tail) = run(&[], &[b"Hel", b"lo"]);
        assert_eq!(
            out,
            vec![Release::Text("Hel".into()), Release::Text("lo".into())]
        );
        assert_eq!(tail, "");
    }

    #[test]
    fn split_utf8_is_reassembled() {
        let euro = "€".as_bytes();
        let (out, _) = run(&[], &[&euro[..1], &euro[1..]]);
        assert_eq!(
            out,
            vec![Release::Text(String::new()), Release::Text("€".into())]
        );
    }

    #[test]
    fn stop_string_across_tokens_is_cut() {
        let (out, _) = run(&["END"], &[b"ab E", b"N", b"D more"]);
        assert_eq!(
            out,
            vec![
                Release::Text("ab ".into()),
                Release::Text(String::new()),
                Release::Stopped(String::new()),
            ]
        );
    }

    #[test]
    fn held_prefix_is_released_when_it_stops_matching() {
        let (out, tail) = run(&["END"], &[b"x E", b"x"]);
        assert_eq!(
            out,
            vec![Release::Text("x ".into()), Release::Text("Ex".into())]
        );
        assert_eq!(tail, "");
    }

    #[test]
    fn held_prefix_is_flushed_at_finish() {
        let (_, tail) = run(&["END"], &[b"x EN"]);
        assert_eq!(tail, "EN");
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        let (out, _) = run(&[], &[b"a\xffb"]);
        assert_eq!(out, vec![Release::Text("a\u{fffd}b".into())]);
    }

    #[test]
    fn released_text_is_a_function_of_the_pieces() {
        // Replaying a prefix and continuing releases the same text as one uninterrupted run.
        let pieces: Vec<&[u8]> = vec![b"The ", b"sto", b"p wo", b"rd ", b"STO", b"P"];
        let (full, _) = run(&["STOP"], &pieces);
        let stop = vec!["STOP".to_string()];
        let mut resumed = TextReleaser::new(&stop);
        for p in &pieces[..3] {
            resumed.push(p);
        }
        let rest: Vec<Release> = pieces[3..].iter().map(|p| resumed.push(p)).collect();
        assert_eq!(rest, full[3..].to_vec());
    }
}
