"""The adapter config allow-list of ``service.lora.adapter_files``: an adapter whose config sets a field the engine
serves (at a value other than its default) registers and gives stock peft's logits; one that sets any other
field, a field peft does not know, a config peft cannot parse, or a target selection the weights do not match,
is refused with a 422 that names it, and the registry is unchanged."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.config import KasaConfig, MontecloraConfig, VeloraConfig
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from service.errors import AdapterError
from service.http.errors import status_of
from service.lora.adapter_files import (
    CONFIG_FILE,
    LORA_FIELDS,
    REFUSED_FIELDS,
    SERVED_FIELDS,
    WEIGHTS_FILE,
    field_default,
)
from service.lora.registry import AdapterRegistry
from service.model.base_model import embedded_gguf
from tests.lora_helpers import FP32_TOLERANCE, batched_logits, load_model, peft_logits, random_ids
from tests.tiny_models import LINEAR_TARGETS


def stock_adapter(base_dir: Path, out: Path, *, convert: bool = False, **options) -> Path:
    """An adapter saved by stock peft with LoraConfig ``options``, after a stand-in for training (every trainable
    parameter moved by seeded N(0, 0.2^2) noise). ``convert``: saved through peft's conversion to plain LoRA, from
    the adapter as it was before training (PiSSA, OLoRA)."""
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    arch = base.config.model_type
    settings = {"r": 4, "lora_alpha": 8, "target_modules": LINEAR_TARGETS[arch], "fan_in_fan_out": arch == "gpt2",
                "task_type": "CAUSAL_LM", **options}
    model = get_peft_model(base, LoraConfig(**settings))
    initial = out.parent / f"{out.name}_initial"
    if convert:
        model.save_pretrained(initial)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    model.save_pretrained(out, path_initial_model_for_weight_conversion=str(initial) if convert else None)
    return out


def edited(base_dir: Path, out: Path, **changes) -> Path:
    """A plain stock-peft adapter whose adapter_config.json then gets ``changes`` (None is written as null)."""
    stock_adapter(base_dir, out)
    config = json.loads((out / CONFIG_FILE).read_text())
    (out / CONFIG_FILE).write_text(json.dumps({**config, **changes}))
    return out


def without_module(base_dir: Path, out: Path, module: str) -> Path:
    """A plain stock-peft adapter whose weights file then loses ``module``'s lora_A and lora_B."""
    stock_adapter(base_dir, out)
    tensors = load_file(out / WEIGHTS_FILE)
    save_file({key: value for key, value in tensors.items() if f".{module}.lora_" not in key}, out / WEIGHTS_FILE)
    return out


def lora_weights_only(out: Path) -> Path:
    """The adapter in ``out`` with its weights file cut to the lora_A and lora_B tensors (peft saves a tied head's
    base weight beside them)."""
    tensors = load_file(out / WEIGHTS_FILE)
    save_file({key: value for key, value in tensors.items() if ".lora_" in key}, out / WEIGHTS_FILE)
    return out


SHIPPED = Path(__file__).resolve().parents[2] / "adapters"  # the adapters the repository ships
UNSERVED = "which the engine does not apply LoRA to"
BASE_CHANGED = ("init_lora_weights", "from the base", "path_initial_model_for_weight_conversion")
# case: (how the adapter is made, what the 422 must say); the first fragment is the field the case is about
REFUSED = {
    "use_dora": (lambda b, o: stock_adapter(b, o, use_dora=True), ("use_dora",)),
    "alora": (lambda b, o: stock_adapter(b, o, alora_invocation_tokens=[17, 18]), ("alora_invocation_tokens",)),
    "pissa": (lambda b, o: stock_adapter(b, o, init_lora_weights="pissa"),
              ("init_lora_weights 'pissa'", *BASE_CHANGED)),
    "pissa_niter": (lambda b, o: stock_adapter(b, o, init_lora_weights="pissa_niter_2"), BASE_CHANGED),
    "olora": (lambda b, o: stock_adapter(b, o, init_lora_weights="olora"), BASE_CHANGED),
    "corda": (lambda b, o: edited(b, o, init_lora_weights="corda"), BASE_CHANGED),
    "lora_ga": (lambda b, o: edited(b, o, init_lora_weights="lora_ga"), BASE_CHANGED),
    "loftq": (lambda b, o: edited(b, o, init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 1}),
              ("init_lora_weights 'loftq'", "LoftQ")),
    "unknown_init": (lambda b, o: edited(b, o, init_lora_weights="zeros"), ("init_lora_weights 'zeros'",)),
    "rank_pattern": (lambda b, o: stock_adapter(b, o, rank_pattern={"q_proj": 2}), ("rank_pattern",)),
    "alpha_pattern": (lambda b, o: stock_adapter(b, o, alpha_pattern={"q_proj": 2}), ("alpha_pattern",)),
    "modules_to_save": (lambda b, o: stock_adapter(b, o, modules_to_save=["lm_head"]), ("modules_to_save",)),
    "bias": (lambda b, o: stock_adapter(b, o, bias="all"), ("bias",)),
    "lora_bias": (lambda b, o: stock_adapter(b, o, lora_bias=True), ("lora_bias",)),
    "layer_replication": (lambda b, o: stock_adapter(b, o, layer_replication=[[0, 2], [1, 2]]),
                          ("layer_replication",)),
    "trainable_token_indices": (lambda b, o: stock_adapter(b, o, trainable_token_indices=[1, 2]),
                                ("trainable_token_indices",)),
    "target_parameters": (lambda b, o: stock_adapter(b, o, target_modules=[],
                                                     target_parameters=["mlp.down_proj.weight"]),
                          ("target_parameters",)),
    "velora_config": (lambda b, o: stock_adapter(b, o, velora_config=VeloraConfig()), ("velora_config",)),
    "kasa_config": (lambda b, o: stock_adapter(b, o, kasa_config=KasaConfig()), ("kasa_config",)),
    "monteclora_config": (lambda b, o: stock_adapter(b, o, monteclora_config=MontecloraConfig()),
                          ("monteclora_config",)),
    "ensure_weight_tying": (lambda b, o: stock_adapter(b, o, ensure_weight_tying=True), ("ensure_weight_tying",)),
    "use_bdlora": (lambda b, o: edited(b, o, use_bdlora={"nblocks": 2}), ("use_bdlora",)),
    "arrow_config": (lambda b, o: edited(b, o, arrow_config={"top_k": 2}), ("arrow_config",)),
    "megatron_config": (lambda b, o: edited(b, o, megatron_config={"tensor_model_parallel_size": 1}),
                        ("megatron_config",)),
    "use_qalora": (lambda b, o: edited(b, o, use_qalora=True), ("use_qalora",)),
    "corda_config": (lambda b, o: edited(b, o, corda_config={"corda_method": "kpm"}), ("corda_config",)),
    "lora_ga_config": (lambda b, o: edited(b, o, lora_ga_config={"direction": "random"}), ("lora_ga_config",)),
    "runtime_config": (lambda b, o: edited(b, o, runtime_config={"ephemeral_gpu_offload": False}),
                       ("runtime_config",)),
    "unknown_field": (lambda b, o: edited(b, o, use_magic=True), ("use_magic", "does not know")),
    "bad_task_type": (lambda b, o: edited(b, o, task_type="TRANSLATE"), ("cannot parse", "TRANSLATE")),
    "pattern_alone": (lambda b, o: edited(b, o, layers_pattern="layers"), ("cannot parse", "layers_pattern")),
    "fewer_targets": (lambda b, o: edited(b, o, target_modules=["q_proj"]),
                      ("weights hold module 'model.layers.0.mlp.down_proj' (and 11 more)", "does not select")),
    "bad_regex": (lambda b, o: edited(b, o, target_modules="("), ("cannot select modules", "target_modules")),
    "bad_exclude_regex": (lambda b, o: edited(b, o, exclude_modules="["), ("cannot select modules", "exclude_modules")),
    "string_layers": (lambda b, o: edited(b, o, layers_to_transform="1"), ("cannot select modules",
                                                                           "layers_to_transform")),
    "no_targets": (lambda b, o: edited(b, o, target_modules=None), ("names no target_modules",)),
    "missing_module": (lambda b, o: without_module(b, o, "layers.1.self_attn.q_proj"),
                       ("selects module 'model.layers.1.self_attn.q_proj'", "which its weights lack")),
    # selections that reach past the linear layers the weights hold: peft selects among all of the base's modules
    "select_everything": (lambda b, o: edited(b, o, target_modules=".*"), ("selects module 'model' (and ", UNSERVED)),
    "select_layers": (lambda b, o: edited(b, o, target_modules=r"model\.layers\.\d+(\..*_proj)?"),
                      ("selects module 'model.layers.0' (and 1 more)", UNSERVED)),
    "lm_head": (lambda b, o: edited(b, o, target_modules=[*LINEAR_TARGETS["llama"], "lm_head"]),
                ("selects module 'lm_head',", UNSERVED)),
    # weights of the head (as peft saves them for a config that names it): the base has one, the engine serves none
    "lm_head_weights": (lambda b, o: lora_weights_only(stock_adapter(b, o, target_modules=[*LINEAR_TARGETS["llama"],
                                                                                         "lm_head"])),
                        ("adapter targets 'lm_head',", UNSERVED)),
    "embed_tokens": (lambda b, o: edited(b, o, target_modules=["embed_tokens", *LINEAR_TARGETS["llama"]]),
                     ("selects module 'model.embed_tokens',", UNSERVED)),
    "norm": (lambda b, o: edited(b, o, target_modules=[*LINEAR_TARGETS["llama"], "norm"]),
             ("selects module 'model.norm',", UNSERVED)),
    "layernorms": (lambda b, o: edited(b, o, target_modules=[*LINEAR_TARGETS["llama"], "input_layernorm"]),
                   ("selects module 'model.layers.0.input_layernorm' (and 1 more)", UNSERVED)),
    "attention_block": (lambda b, o: edited(b, o, target_modules=[*LINEAR_TARGETS["llama"], "self_attn"]),
                        ("selects module 'model.layers.0.self_attn' (and 1 more)", UNSERVED)),
}

# case: (architecture, how the adapter is made), each setting served fields at values other than their defaults
SERVED = {
    "plain": ("llama", lambda b, o: stock_adapter(b, o)),
    "rank_and_alpha": ("llama", lambda b, o: stock_adapter(b, o, r=6, lora_alpha=3.5)),
    "use_rslora": ("llama", lambda b, o: stock_adapter(b, o, use_rslora=True)),
    "lora_dropout": ("llama", lambda b, o: stock_adapter(b, o, lora_dropout=0.3)),
    "init_false": ("llama", lambda b, o: stock_adapter(b, o, init_lora_weights=False)),
    "init_gaussian": ("llama", lambda b, o: stock_adapter(b, o, init_lora_weights="gaussian")),
    "init_orthogonal": ("llama", lambda b, o: stock_adapter(b, o, init_lora_weights="orthogonal")),
    "init_eva": ("llama", lambda b, o: stock_adapter(b, o, init_lora_weights="eva")),
    "init_mica": ("llama", lambda b, o: stock_adapter(b, o, init_lora_weights="mica")),
    "pissa_converted": ("llama", lambda b, o: stock_adapter(b, o, init_lora_weights="pissa", convert=True)),
    "olora_converted": ("llama", lambda b, o: stock_adapter(b, o, init_lora_weights="olora", convert=True)),
    "target_regex": ("llama", lambda b, o: stock_adapter(b, o, target_modules=r".*\.(q_proj|down_proj)")),
    "target_regex_all_proj": ("llama", lambda b, o: stock_adapter(b, o, target_modules=r".*proj")),
    "target_regex_gpt2": ("gpt2", lambda b, o: stock_adapter(b, o, target_modules=r".*\.(c_attn|c_fc)")),
    # peft's shorthand, which peft expands when it loads the adapter (an adapter it saves holds the names instead)
    "all_linear": ("llama", lambda b, o: edited(b, o, target_modules="all-linear")),
    "all_linear_gpt2": ("gpt2", lambda b, o: edited(b, o, target_modules="ALL-LINEAR")),
    "exclude_modules": ("llama", lambda b, o: stock_adapter(b, o, exclude_modules=["o_proj", "layers.0.mlp.up_proj"])),
    "layers_to_transform": ("llama", lambda b, o: stock_adapter(b, o, layers_to_transform=[1],
                                                                layers_pattern="layers")),
    "one_layer": ("llama", lambda b, o: stock_adapter(b, o, layers_to_transform=0)),
    "gpt2_mlp_c_proj": ("gpt2", lambda b, o: stock_adapter(b, o, target_modules=["c_attn", "mlp.c_proj"])),
    "fan_in_fan_out_linear": ("llama", lambda b, o: edited(b, o, fan_in_fan_out=True)),
    "fan_in_fan_out_conv1d": ("gpt2", lambda b, o: edited(b, o, fan_in_fan_out=False)),
    "labels": ("llama", lambda b, o: edited(b, o, base_model_name_or_path="elsewhere/model", revision="v2",
                                            peft_version="0.99.0", inference_mode=False,
                                            auto_mapping={"base_model_class": "X", "parent_library": "y"})),
    "unused_settings": ("llama", lambda b, o: edited(b, o, megatron_core="other.core", qalora_group_size=32,
                                                     loftq_config={"loftq_bits": 4, "loftq_iter": 1},
                                                     eva_config={"rho": 2.0})),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("configs")


@pytest.fixture(scope="module")
def registries(request, root):
    """``get(arch)``: (model, registry) over the tiny base of ``arch``, made on first use."""
    made = {}

    def get(arch: str) -> tuple:
        if arch not in made:
            model = load_model(request.getfixturevalue(f"tiny_{arch}_dir"))
            made[arch] = model, AdapterRegistry(model, roots=[root], max_resident=2, max_rank=64)
        return made[arch]
    return get


@pytest.fixture(scope="module")
def served(request, root) -> dict[str, Path]:
    """Every SERVED case's adapter folder."""
    return {case: make(request.getfixturevalue(f"tiny_{arch}_dir"), root / f"served_{case}")
            for case, (arch, make) in SERVED.items()}


def test_every_lora_config_field_is_served_or_refused_with_a_reason():
    assert set(SERVED_FIELDS) | set(REFUSED_FIELDS) == set(LORA_FIELDS)
    assert not set(SERVED_FIELDS) & set(REFUSED_FIELDS)
    assert all(SERVED_FIELDS.values()) and all(REFUSED_FIELDS.values())


def test_every_refused_field_has_a_case():
    assert set(REFUSED_FIELDS) <= {fragments[0] for _, fragments in REFUSED.values()}


def test_every_served_field_is_set_in_some_case(served):
    """Each served field is at a value other than its default in some case's adapter_config.json."""
    changed = set()
    for folder in served.values():
        config = json.loads((folder / CONFIG_FILE).read_text())
        changed |= {name for name, value in config.items() if value != field_default(LORA_FIELDS[name])}
    assert set(SERVED_FIELDS) <= changed, set(SERVED_FIELDS) - changed


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unserved_configs_are_refused_by_name(registries, tiny_llama_dir, root, case):
    make, fragments = REFUSED[case]
    folder = make(tiny_llama_dir, root / f"refused_{case}")
    _, registry = registries("llama")
    before = registry.describe()
    with pytest.raises(AdapterError) as refusal:
        registry.register(case, folder)
    assert status_of(type(refusal.value)) == 422
    assert all(fragment in str(refusal.value) for fragment in fragments), str(refusal.value)
    assert registry.describe() == before


@pytest.mark.parametrize("case", sorted(SERVED))
def test_served_configs_register_and_match_peft(request, registries, served, case):
    arch = SERVED[case][0]
    model, registry = registries(arch)
    ids = random_ids(2, 8, seed=3)
    registry.register(case, served[case])
    try:
        ours = batched_logits(model, registry, [case, case], ids)
    finally:
        registry.unregister(case)
    error = (ours - peft_logits(request.getfixturevalue(f"tiny_{arch}_dir"), served[case], ids)).abs().max().item()
    assert error < FP32_TOLERANCE, f"{case} differs from peft by {error:.2e}"


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_converted_adapter_serves_what_was_trained(registries, tiny_llama_dir, served, root, init):
    """The conversion the refusal points to: served, the converted adapter gives what peft gives for the adapter
    as trained (on the base peft changes), which the trained adapter applied as plain LoRA does not."""
    trained = stock_adapter(tiny_llama_dir, root / f"trained_{init}", init_lora_weights=init)
    model, registry = registries("llama")
    ids = random_ids(2, 8, seed=4)
    registry.register("converted", served[f"{init}_converted"])
    try:
        ours = batched_logits(model, registry, ["converted", "converted"], ids)
    finally:
        registry.unregister("converted")
    want = peft_logits(tiny_llama_dir, trained, ids)
    assert (ours - want).abs().max().item() < 1e-4
    as_plain_lora = json.loads((trained / CONFIG_FILE).read_text()) | {"init_lora_weights": True}
    (trained / CONFIG_FILE).write_text(json.dumps(as_plain_lora))
    assert (peft_logits(tiny_llama_dir, trained, ids) - want).abs().max().item() > 0.01


def test_a_refused_selection_leaves_a_populated_registry_as_it_was(registries, served, root, tiny_llama_dir):
    """An adapter whose config selects every module (".*") while its weights hold the linear layers is refused,
    and the adapters registered before are there, as they were."""
    _, registry = registries("llama")
    registry.register("kept", served["plain"])
    try:
        before = registry.describe()
        with pytest.raises(AdapterError, match=UNSERVED):
            registry.register("everything", edited(tiny_llama_dir, root / "everything", target_modules=".*"))
        assert registry.describe() == before and registry.names() == ["kept"]
    finally:
        registry.unregister("kept")


@pytest.mark.smollm2
def test_the_shipped_adapters_register_on_the_embedded_base():
    """adapters/nli and adapters/squad select only linear layers among all of SmolLM2's modules: they register on
    its architecture (built from the GGUF's config, on the meta device: only names and shapes are read)."""
    gguf = embedded_gguf()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name))
    registry = AdapterRegistry(model, roots=[SHIPPED], max_resident=2, max_rank=64)
    for name in ("nli", "squad"):
        described, _ = registry.register(name, SHIPPED / name)
        assert sorted(described["target_modules"]) == sorted(LINEAR_TARGETS["llama"])
    assert registry.names() == ["nli", "squad"]
