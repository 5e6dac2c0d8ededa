//! (in progress — minimal placeholder until the full tokenizer lands)
use crate::error::{Error, Result};
use std::path::Path;

pub struct LmTokenizer {
    inner: tokenizers::Tokenizer,
}

impl LmTokenizer {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let p = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&p).map_err(|e| Error::BadTokenizer {
            path: p.clone(),
            msg: e.to_string(),
        })?;
        Ok(Self { inner })
    }
    pub fn from_gguf(_c: &candle_core::quantized::gguf_file::Content, path: &Path) -> Result<Self> {
        Err(Error::BadTokenizer {
            path: path.into(),
            msg: "GGUF tokenizers not yet supported".into(),
        })
    }
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec())
    }
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }
    pub fn continuation(&self, prompt: &[u32], generated: &[u32]) -> Result<String> {
        let mut all = prompt.to_vec();
        all.extend_from_slice(generated);
        let full = self.decode(&all)?;
        let p = self.decode(prompt)?;
        Ok(full
            .strip_prefix(p.as_str())
            .map(str::to_string)
            .unwrap_or(self.decode(generated)?))
    }
    pub fn bos_token_id(&self) -> Option<u32> {
        None
    }
    pub fn eos_token_id(&self) -> Option<u32> {
        None
    }
}
