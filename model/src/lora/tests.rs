use super::*;
use crate::{Dtype, ModelConfig};
use tch::Device;

fn config() -> ModelConfig {
    ModelConfig {
        hidden_size: 48,
        intermediate_size: 80,
        num_layers: 2,
        num_heads: 6,
        num_kv_heads: 2,
        head_dim: 8,
        qkv_bias: true,
        tie_word_embeddings: false,
        ..crate::builtin::tiny_arith_config()
    }
}

/// A model with adapters whose B is not zero (as after training), so that
/// they change what the model computes.
fn adapted(lora: &LoraConfig) -> Transformer {
    let mut model = Transformer::new(config(), Device::Cpu, Dtype::F32, 3).unwrap();
    model.attach_lora(lora, 9, None).unwrap();
    tch::manual_seed(4);
    tch::no_grad(|| {
        // In name order: the same draws for the same matrices.
        let mut vars: Vec<_> = model.adapter_store().unwrap().variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, t) in vars {
            if name.contains("lora_B") {
                t.shallow_clone().copy_(&(t.randn_like() * 0.05));
            }
        }
    });
    model
}

fn merged_model(model: &Transformer) -> Transformer {
    let plain = Transformer::new(config(), Device::Cpu, Dtype::F32, 0).unwrap();
    plain.load_named(model.merged_weights()).unwrap();
    plain
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn ids() -> Tensor {
    Tensor::from_slice2(&[[3i64, 7, 9, 11, 4, 5], [6, 2, 8, 10, 12, 13]])
}

#[test]
fn a_fresh_adapter_changes_nothing_and_a_trained_one_equals_its_merged_weights() {
    let base = Transformer::new(config(), Device::Cpu, Dtype::F32, 3).unwrap();
    let mut fresh = Transformer::new(config(), Device::Cpu, Dtype::F32, 3).unwrap();
    fresh.attach_lora(&LoraConfig::default(), 9, None).unwrap();
    let _guard = tch::no_grad_guard();
    assert_eq!(max_diff(&fresh.forward(&ids(), None), &base.forward(&ids(), None)), 0.0, "B starts at zero");

    let lora = LoraConfig { targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()], ..LoraConfig::default() };
    let model = adapted(&lora);
    let merged = merged_model(&model);
    let moved = max_diff(&model.forward(&ids(), None), &base.forward(&ids(), None));
    let diff = max_diff(&model.forward(&ids(), None), &merged.forward(&ids(), None));
    assert!(moved > 1e-3, "the adapters changed the logits by {moved} only");
    assert!(diff < 1e-5, "adapters vs merged weights: {diff}");
    // Cached decoding runs the adapters too (the unfused path).
    let (mut a, mut b) = (model.new_cache(2, 8), merged.new_cache(2, 8));
    let x = model.forward_cached(&ids(), None, &mut a, false).unwrap();
    let y = merged.forward_cached(&ids(), None, &mut b, false).unwrap();
    assert!(max_diff(&x, &y) < 1e-5);
    let next = Tensor::from_slice2(&[[5i64], [9]]);
    let x = model.forward_cached(&next, None, &mut a, true).unwrap();
    let y = merged.forward_cached(&next, None, &mut b, true).unwrap();
    assert!(max_diff(&x, &y) < 1e-5, "decode step: {}", max_diff(&x, &y));
    // Only the named projections were adapted.
    let names: Vec<String> = model.adapter_store().unwrap().variables().into_keys().collect();
    assert_eq!(names.len(), 2 * 2 * 3, "{names:?}");
    assert!(names.iter().all(|n| n.starts_with("base_model.model.model.layers.") && !n.contains("k_proj")));
}

#[test]
fn gradients_reach_the_adapters_only() {
    let model = adapted(&LoraConfig::default());
    let loss = model.forward(&ids(), None).square().mean(Kind::Float);
    loss.backward();
    for (name, t) in model.var_store().variables() {
        assert!(!t.requires_grad() && !t.grad().defined(), "base parameter {name} is trainable");
    }
    for (name, t) in model.adapter_store().unwrap().variables() {
        assert!(t.grad().defined() && t.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0, "adapter {name} got no gradient");
    }
}

#[test]
fn a_saved_adapter_merges_into_its_base_and_lying_ones_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let model = adapted(&LoraConfig { rank: 4, alpha: 8.0, ..LoraConfig::default() });
    model.save_adapter(dir.path()).unwrap();
    let mut base = Transformer::new(config(), Device::Cpu, Dtype::F32, 3).unwrap();
    base.merge_adapter(dir.path()).unwrap();
    let _guard = tch::no_grad_guard();
    assert!(max_diff(&base.forward(&ids(), None), &model.forward(&ids(), None)) < 1e-5);

    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join(ADAPTER_CONFIG)).unwrap()).unwrap();
    assert_eq!((json["r"].as_u64(), json["lora_alpha"].as_f64()), (Some(4), Some(8.0)));
    let rewrite = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut j = json.clone();
        edit(&mut j);
        std::fs::write(dir.path().join(ADAPTER_CONFIG), j.to_string()).unwrap();
        let mut base = Transformer::new(config(), Device::Cpu, Dtype::F32, 3).unwrap();
        base.merge_adapter(dir.path()).unwrap_err().to_string()
    };
    let e = rewrite(&|j| j["use_dora"] = true.into());
    assert!(e.contains("adapter_config.json") && e.contains("use_dora"), "{e}");
    let e = rewrite(&|j| j["r"] = 5.into());
    assert!(e.contains("adapter_model.safetensors") && e.contains("lora_A") && e.contains("[5, "), "{e}");
    let e = rewrite(&|j| j["peft_type"] = "IA3".into());
    assert!(e.contains("LORA"), "{e}");
    // A model without the adapted module.
    std::fs::write(dir.path().join(ADAPTER_CONFIG), json.to_string()).unwrap();
    let mut other = Transformer::new(ModelConfig { num_layers: 1, ..config() }, Device::Cpu, Dtype::F32, 3).unwrap();
    let e = other.merge_adapter(dir.path()).unwrap_err().to_string();
    assert!(e.contains("model.layers.1.") && e.contains("does not have"), "{e}");
}

#[test]
fn bad_settings_name_their_key() {
    let cases: Vec<(LoraConfig, &str)> = vec![
        (LoraConfig { rank: 0, ..LoraConfig::default() }, "learner.lora.rank"),
        (LoraConfig { alpha: 0.0, ..LoraConfig::default() }, "learner.lora.alpha"),
        (LoraConfig { dropout: 1.0, ..LoraConfig::default() }, "learner.lora.dropout"),
        (LoraConfig { targets: vec![], ..LoraConfig::default() }, "learner.lora.targets"),
        (LoraConfig { targets: vec!["qproj".into()], ..LoraConfig::default() }, "learner.lora.targets"),
        (LoraConfig { targets: vec!["q_proj".into(), "q_proj".into()], ..LoraConfig::default() }, "learner.lora.targets"),
    ];
    for (c, key) in cases {
        assert_eq!(c.validate("learner.lora").unwrap_err().key, key);
    }
    LoraConfig::default().validate("learner.lora").unwrap();
}

/// What a rollout receiving the adapters alone computes: the frozen base
/// with [`merge_named`] of [`Transformer::adapter_weights`] is the learner's
/// [`Transformer::merged_weights`], bit for bit; a set with a lone A or a
/// module the model lacks is refused, naming what sent it.
#[test]
fn adapters_merged_over_the_base_are_the_merged_weights_exactly() {
    let lora = LoraConfig { rank: 4, alpha: 8.0, targets: vec!["q_proj".into(), "down_proj".into()], ..LoraConfig::default() };
    let model = adapted(&lora);
    let (scale, adapters) = model.adapter_weights().expect("adapters");
    assert_eq!(scale, 2.0);
    // Two layers × two targets, an A and a B each.
    assert_eq!(adapters.len(), 8);
    let base: HashMap<String, Tensor> = model.var_store().variables();
    let source = Path::new("weights v3 from the learner");
    let merged = merge_named(&base, adapters.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect(), scale, None, source).unwrap();
    assert_eq!(merged.len(), 4);
    let want: HashMap<String, Tensor> = model.merged_weights().into_iter().collect();
    for (name, w) in &merged {
        assert!(w.equal(&want[name]), "{name} differs from the learner's merge");
        assert!(!w.equal(&base[name]), "{name}: the adapter changed nothing");
    }

    let without = |skip: &str| adapters.iter().filter(|(n, _)| !n.contains(skip)).map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
    let e = merge_named(&base, without("layers.1.mlp.down_proj.lora_B"), scale, None, source).unwrap_err().to_string();
    assert!(e.contains("weights v3 from the learner") && e.contains("layers.1.mlp.down_proj.lora_B"), "{e}");
    let one_layer: HashMap<String, Tensor> = base.iter().filter(|(n, _)| !n.contains("layers.1.")).map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
    let e = merge_named(&one_layer, without("nothing"), scale, None, source).unwrap_err().to_string();
    assert!(e.contains("weights v3 from the learner") && e.contains("does not have"), "{e}");
}
