//! The text tokenizer (`tokenizer.json` through the `tokenizers` crate).

use std::path::Path;

use crate::error::{ModelError, Result};

/// Encodes user text to ids and decodes generated ids to text.
///
/// Template special ids are inserted by the skills, never by the tokenizer: encoding uses
/// `add_special_tokens = false`, decoding skips special tokens (spec §2.3).
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab", &self.inner.get_vocab_size(true))
            .finish()
    }
}

impl TextTokenizer {
    /// Load `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| ModelError::Tokenizer(format!("cannot load {}: {e}", path.display())))?;
        Ok(Self { inner })
    }

    /// Load from the JSON text of a `tokenizer.json`.
    pub fn from_json(json: &str) -> Result<Self> {
        let inner = json
            .parse::<tokenizers::Tokenizer>()
            .map_err(|e| ModelError::Tokenizer(format!("invalid tokenizer.json: {e}")))?;
        Ok(Self { inner })
    }

    /// Token ids of `text`, without any special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> TextTokenizer {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/md3-tiny/tokenizer.json");
        TextTokenizer::from_file(&p).unwrap()
    }

    #[test]
    fn encodes_fixture_prompts_like_the_reference() {
        let t = fixture();
        // query_landscape: prompt = [1, 355, 2] + enc("How many objects are there?") + [3]
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/md3-tiny/expected/query_landscape.json");
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let ids: Vec<u32> = v["prompt"]["prompt_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let q = t.encode("How many objects are there?").unwrap();
        assert_eq!(&ids[3..ids.len() - 1], &q[..]);
    }

    #[test]
    fn decode_skips_special_tokens() {
        let t = fixture();
        let ids = t.encode("hello world").unwrap();
        let mut with_special = vec![0u32, 3];
        with_special.extend(&ids);
        with_special.push(0);
        assert_eq!(t.decode(&with_special).unwrap(), t.decode(&ids).unwrap());
    }

    #[test]
    fn bad_tokenizer_json_is_an_error() {
        assert!(TextTokenizer::from_json("{}").is_err());
        assert!(TextTokenizer::from_file(Path::new("/nonexistent/tokenizer.json")).is_err());
    }
}
