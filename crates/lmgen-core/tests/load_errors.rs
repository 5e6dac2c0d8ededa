//! Every way a checkpoint can be wrong gives a typed error naming the file and tensor.
use lmgen_core::hub::ModelLocation;
use lmgen_core::{load, Error, LoadOptions};
use safetensors::tensor::TensorView;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

/// Copy a fixture directory into a temp dir.
fn copy(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
    }
    tmp
}

fn load_err(dir: &Path) -> Error {
    match load(
        &ModelLocation::Dir(dir.to_path_buf()),
        &LoadOptions::default(),
    ) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e,
    }
}

/// Rewrite `model.safetensors` through `edit(name, shape, bytes) -> Option<(name, shape, bytes)>`,
/// plus `extra` tensors.
fn rewrite(
    dir: &Path,
    edit: impl Fn(&str, Vec<usize>, Vec<u8>) -> Option<(String, Vec<usize>, Vec<u8>)>,
    extra: &[(&str, Vec<usize>)],
) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        if let Some((n, s, d)) = edit(&name, view.shape().to_vec(), view.data().to_vec()) {
            owned.push((n, view.dtype(), s, d));
        }
    }
    let dtype = owned[0].1;
    for (n, s) in extra {
        let count: usize = s.iter().product();
        owned.push((
            n.to_string(),
            dtype,
            s.clone(),
            vec![0u8; count * dtype.bitsize() / 8],
        ));
    }
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(n, dt, s, d)| (n.clone(), TensorView::new(*dt, s.clone(), d).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

#[test]
fn missing_tensor_is_named() {
    let d = copy("gpt2");
    rewrite(
        &d.path(),
        |n, s, b| {
            (n != "h.1.mlp.c_fc.bias" && n != "transformer.h.1.mlp.c_fc.bias")
                .then(|| (n.to_string(), s, b))
        },
        &[],
    );
    let e = load_err(d.path());
    assert!(matches!(e, Error::MissingTensor { .. }), "{e}");
    assert!(e.to_string().contains("h.1.mlp.c_fc.bias"), "{e}");
    assert!(e.is_user_error());
}

#[test]
fn unused_tensor_is_named_with_its_file() {
    let d = copy("gpt2");
    rewrite(
        &d.path(),
        |n, s, b| Some((n.to_string(), s, b)),
        &[("h.0.attn.mystery.weight", vec![2, 2])],
    );
    let e = load_err(d.path());
    assert!(matches!(e, Error::UnusedTensor { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("h.0.attn.mystery.weight") && msg.contains("model.safetensors"),
        "{msg}"
    );
}

#[test]
fn misshaped_tensor_is_named_with_both_shapes() {
    let d = copy("llama-mqa-tied");
    rewrite(
        &d.path(),
        |n, mut s, b| {
            if n == "model.layers.0.post_attention_layernorm.weight" {
                // Same byte count, different shape.
                s = vec![s[0] / 2, 2];
            }
            Some((n.to_string(), s, b))
        },
        &[],
    );
    let e = load_err(d.path());
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("model.layers.0.post_attention_layernorm.weight"),
        "{e}"
    );
}

#[test]
fn truncated_safetensors_names_the_file() {
    let d = copy("bloom");
    let p = d.path().join("model.safetensors");
    let len = std::fs::metadata(&p).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(len / 2).unwrap();
    let e = load_err(d.path());
    assert!(matches!(e, Error::BadWeights { .. }), "{e}");
    assert!(e.to_string().contains("model.safetensors"), "{e}");
}

#[test]
fn garbage_safetensors_header_names_the_file() {
    let d = copy("bloom");
    std::fs::write(
        d.path().join("model.safetensors"),
        b"\xff\xff\xff\xff\xff\xff\x00\x00not a header",
    )
    .unwrap();
    let e = load_err(d.path());
    assert!(matches!(e, Error::BadWeights { .. }), "{e}");
    assert!(e.to_string().contains("model.safetensors"), "{e}");
}

#[test]
fn truncated_torch_bin_names_the_file() {
    let d = copy("mistral-swa");
    let p = d.path().join("pytorch_model.bin");
    let len = std::fs::metadata(&p).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(len - 200)
        .unwrap();
    let e = load_err(d.path());
    assert!(e.is_user_error(), "{e}");
    assert!(e.to_string().contains("pytorch_model.bin"), "{e}");
}

#[test]
fn missing_shard_named_from_index() {
    let d = copy("llama");
    let shard = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("model-0000")
        })
        .unwrap();
    std::fs::remove_file(&shard).unwrap();
    let e = load_err(d.path());
    assert!(
        e.to_string()
            .contains(&*shard.file_name().unwrap().to_string_lossy()),
        "{e}"
    );
}

#[test]
fn unknown_architecture_lists_supported_ones() {
    let d = copy("gpt2");
    let cfg = std::fs::read_to_string(d.path().join("config.json")).unwrap();
    let cfg = cfg
        .replace("GPT2LMHeadModel", "FancyNetForCausalLM")
        .replace("\"gpt2\"", "\"fancynet\"");
    std::fs::write(d.path().join("config.json"), cfg).unwrap();
    let e = load_err(d.path());
    assert!(matches!(e, Error::UnknownArchitecture { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("FancyNetForCausalLM")
            && msg.contains("BloomForCausalLM")
            && msg.contains("config.json"),
        "{msg}"
    );
}

#[test]
fn directory_without_weights_or_config() {
    let d = copy("gpt2");
    std::fs::remove_file(d.path().join("model.safetensors")).unwrap();
    let e = load_err(d.path());
    assert!(
        matches!(e, Error::BadWeights { .. }) && e.to_string().contains("no weights found"),
        "{e}"
    );
    std::fs::remove_file(d.path().join("config.json")).unwrap();
    let e = load_err(d.path());
    assert!(e.to_string().contains("config.json"), "{e}");
}

#[test]
fn missing_model_path_is_a_user_error() {
    let e = lmgen_core::hub::resolve("/nonexistent/model-dir", None).unwrap_err();
    assert!(
        e.is_user_error() && e.to_string().contains("/nonexistent/model-dir"),
        "{e}"
    );
}
