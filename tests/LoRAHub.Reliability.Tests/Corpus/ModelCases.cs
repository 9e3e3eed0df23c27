using System.Text.Json.Nodes;
using LoRAHub.Models;
using LoRAHub.Models.Tokenization;
using LoRAHub.Plugins.LoRA;
using LoRAHub.Safetensors;
using LoRAHub.Tuners;

namespace LoRAHub.Reliability.Tests.Corpus;

/// <summary>
/// Model folders (config.json + model.safetensors: H5), tokenizers (tokenizer.json, tokenizer_config.json with its
/// chat_template: H5) and adapter folders (adapter_config.json + adapter_model.safetensors: H3), each mutated from a
/// valid one saved by the product.
/// </summary>
public static class ModelCases
{
    private sealed record Seed(string Config, byte[] Weights, string Tokenizer, string AdapterConfig, byte[] AdapterWeights);

    private static readonly Lazy<Seed> Valid = new(() =>
    {
        using var temp = new TempFolder("corpus-seed");
        using var model = TrainChild.TinyModel();
        PretrainedModel.Save(model, temp["model"]);
        using (var adapter = TrainChild.AttachLora(model)) adapter.Save(temp["adapter"]);
        return new Seed(File.ReadAllText(temp["model", "config.json"]), File.ReadAllBytes(temp["model", "model.safetensors"]),
            File.ReadAllText(Path.Combine(RepoRoot(), "examples", "base-model", "tokenizer.json")),
            File.ReadAllText(temp["adapter", "adapter_config.json"]), File.ReadAllBytes(temp["adapter", "adapter_model.safetensors"]));
    });

    public static string RepoRoot()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
            if (File.Exists(Path.Combine(dir.FullName, "LoRAHub.sln"))) return dir.FullName;
        throw new InvalidOperationException("repository root (LoRAHub.sln) not found above " + AppContext.BaseDirectory);
    }

    private static void LoadModel(string folder) => PretrainedModel.Load(folder).Dispose();

    private static BadInput ConfigCase(string name, Func<JsonObject, JsonNode?> mutate) => new("config.json", name, "H5", folder =>
    {
        var config = JsonNode.Parse(Valid.Value.Config)!.AsObject();
        var replaced = mutate(config);
        File.WriteAllText(Path.Combine(folder, "config.json"), (replaced ?? config).ToJsonString());
        File.WriteAllBytes(Path.Combine(folder, "model.safetensors"), Valid.Value.Weights);
        return Path.Combine(folder, "config.json");
    }, LoadModel);

    private static BadInput RawConfigCase(string name, string text) => new("config.json", name, "H5", folder =>
    {
        File.WriteAllText(Path.Combine(folder, "config.json"), text);
        File.WriteAllBytes(Path.Combine(folder, "model.safetensors"), Valid.Value.Weights);
        return Path.Combine(folder, "config.json");
    }, LoadModel);

    /// <summary>Model weights that are valid safetensors but wrong for config.json: the error must name the tensor.</summary>
    private static BadInput WeightsCase(string name, Func<Dictionary<string, Tensor>, Dictionary<string, Tensor>> mutate) => new("model weights", name, "H5", folder =>
    {
        File.WriteAllText(Path.Combine(folder, "config.json"), Valid.Value.Config);
        var path = Path.Combine(folder, "model.safetensors");
        File.WriteAllBytes(path, Valid.Value.Weights);
        var tensors = torchx.load_safetensors(path);
        torchx.save_safetensors(mutate(tensors), path);
        return folder;
    }, LoadModel);

    private static BadInput TokenizerCase(string name, Func<JsonObject, JsonNode?> mutate, string? tokenizerConfig = null) => new("tokenizer.json", name, "H5", folder =>
    {
        var json = JsonNode.Parse(Valid.Value.Tokenizer)!.AsObject();
        var replaced = mutate(json);
        File.WriteAllText(Path.Combine(folder, "tokenizer.json"), (replaced ?? json).ToJsonString());
        if (tokenizerConfig != null) File.WriteAllText(Path.Combine(folder, "tokenizer_config.json"), tokenizerConfig);
        return Path.Combine(folder, tokenizerConfig != null ? "tokenizer_config.json" : "tokenizer.json");
    }, folder =>
    {
        var tok = Tokenizer.FromFolder(folder);
        tok.Encode("hello world");
        tok.ApplyChatTemplate([("user", "hi"), ("assistant", "ok")], addGenerationPrompt: true);
    });

    private static BadInput RawTokenizerCase(string name, string text) => new("tokenizer.json", name, "H5", folder =>
    {
        File.WriteAllText(Path.Combine(folder, "tokenizer.json"), text);
        return Path.Combine(folder, "tokenizer.json");
    }, folder => Tokenizer.FromFolder(folder).Encode("hello"));

    private static void LoadAdapter(string folder)
    {
        using var model = TrainChild.TinyModel();
        using var adapter = new LoraMethod().Load(model, folder);
    }

    private static BadInput AdapterCase(string name, Func<JsonObject, JsonNode?> mutate) => new("adapter_config.json", name, "H3", folder =>
    {
        var json = JsonNode.Parse(Valid.Value.AdapterConfig)!.AsObject();
        var replaced = mutate(json);
        File.WriteAllText(Path.Combine(folder, "adapter_config.json"), (replaced ?? json).ToJsonString());
        File.WriteAllBytes(Path.Combine(folder, "adapter_model.safetensors"), Valid.Value.AdapterWeights);
        return Path.Combine(folder, "adapter_config.json");
    }, LoadAdapter);

    private static BadInput AdapterWeightsCase(string name, Func<Dictionary<string, Tensor>, Dictionary<string, Tensor>> mutate) => new("adapter weights", name, "H3", folder =>
    {
        File.WriteAllText(Path.Combine(folder, "adapter_config.json"), Valid.Value.AdapterConfig);
        var path = Path.Combine(folder, "adapter_model.safetensors");
        File.WriteAllBytes(path, Valid.Value.AdapterWeights);
        var tensors = torchx.load_safetensors(path);
        torchx.save_safetensors(mutate(tensors), path);
        return folder;
    }, LoadAdapter);

    private static Func<JsonObject, JsonNode?> Set(string key, JsonNode? value) => o => { o[key] = value; return null; };
    private static Func<JsonObject, JsonNode?> Remove(string key) => o => { o.Remove(key); return null; };

    public static IEnumerable<BadInput> All()
    {
        // config.json
        foreach (var (label, text) in new[] { ("empty", ""), ("not JSON", "model_type=llama"), ("an array", "[]"), ("truncated", "{\"model_type\": \"llama\", \"hidden"), ("null", "null") })
            yield return RawConfigCase(label, text);
        yield return ConfigCase("model_type missing", Remove("model_type"));
        foreach (var v in new JsonNode?[] { "bert", "", 5, null, JsonValue.Create(true), new JsonArray("llama") })
            yield return ConfigCase($"model_type {v?.ToJsonString() ?? "null"}", Set("model_type", v)) with { Field = "model_type" };
        foreach (var key in new[] { "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "max_position_embeddings" })
            foreach (var v in new JsonNode?[] { 0, -1, "32", 2.5, 1L << 40, null })
                yield return ConfigCase($"{key} = {v?.ToJsonString() ?? "null"}", Set(key, v)) with { Field = key };
        yield return ConfigCase("heads do not divide hidden_size", Set("num_attention_heads", 5));
        yield return ConfigCase("kv heads do not divide heads", Set("num_key_value_heads", 3));
        yield return ConfigCase("kv heads above heads", Set("num_key_value_heads", 8));
        foreach (var (key, v) in new (string, JsonNode?)[] { ("rms_norm_eps", "tiny"), ("rms_norm_eps", -1), ("rope_theta", 0), ("rope_theta", "x"),
                     ("rope_scaling", 5), ("rope_scaling", new JsonObject { ["rope_type"] = "unheard-of", ["factor"] = 2 }), ("rope_scaling", new JsonObject { ["type"] = "linear", ["factor"] = "two" }),
                     ("tie_word_embeddings", "yes"), ("hidden_act", "swishy"), ("torch_dtype", "float7"), ("eos_token_id", "x"), ("eos_token_id", new JsonObject()),
                     ("head_dim", 0), ("head_dim", 7), ("sliding_window", -4), ("layer_types", new JsonArray("full_attention")) })
            yield return ConfigCase($"{key} = {v?.ToJsonString() ?? "null"}", Set(key, v)) with { Field = key };

        // Model weights that disagree with config.json.
        yield return WeightsCase("a tensor with the wrong shape", t => { var k = t.Keys.First(k => k.EndsWith("q_proj.weight")); t[k] = torch.zeros(3, 3); return t; });
        yield return WeightsCase("a tensor missing", t => { t.Remove(t.Keys.First(k => k.EndsWith("v_proj.weight"))); return t; });
        yield return WeightsCase("an unexpected tensor", t => { t["model.layers.9.self_attn.q_proj.weight"] = torch.zeros(2, 2); return t; });
        yield return WeightsCase("embedding with too few rows", t => { var k = t.Keys.First(k => k.Contains("embed_tokens")); t[k] = torch.zeros(10, 32); return t; });
        // transformers casts checkpoint tensors to the model's dtype on load, so integer weights load (as zeros) there too.
        yield return WeightsCase("integer weights", t => { var k = t.Keys.First(k => k.EndsWith("o_proj.weight")); t[k] = torch.zeros(t[k].shape, ScalarType.Int64); return t; }) with { MayLoad = true };
        yield return WeightsCase("scalar weight", t => { var k = t.Keys.First(k => k.EndsWith("norm.weight")); t[k] = torch.tensor(1.0f); return t; });
        yield return new BadInput("model weights", "only pytorch_model.bin (pickle)", "H6", folder =>
        {
            File.WriteAllText(Path.Combine(folder, "config.json"), Valid.Value.Config);
            File.WriteAllBytes(Path.Combine(folder, "pytorch_model.bin"), [(byte)'P', (byte)'K', 3, 4, .. new byte[64]]);
            return folder;
        }, LoadModel);
        yield return new BadInput("model weights", "no weights at all", "H6", folder =>
        {
            File.WriteAllText(Path.Combine(folder, "config.json"), Valid.Value.Config);
            return folder;
        }, LoadModel);
        yield return new BadInput("model weights", "shard index names a missing shard", "H6", folder =>
        {
            File.WriteAllText(Path.Combine(folder, "config.json"), Valid.Value.Config);
            File.WriteAllText(Path.Combine(folder, "model.safetensors.index.json"), "{\"metadata\":{},\"weight_map\":{\"lm_head.weight\":\"model-00001-of-00002.safetensors\"}}");
            return Path.Combine(folder, "model.safetensors.index.json");
        }, LoadModel);
        yield return new BadInput("model weights", "shard index escapes the folder", "H6", folder =>
        {
            File.WriteAllText(Path.Combine(folder, "config.json"), Valid.Value.Config);
            File.WriteAllText(Path.Combine(folder, "model.safetensors.index.json"), "{\"weight_map\":{\"lm_head.weight\":\"../../etc/passwd\"}}");
            return Path.Combine(folder, "model.safetensors.index.json");
        }, LoadModel);

        // tokenizer.json and tokenizer_config.json (the chat template lives there).
        foreach (var (label, text) in new[] { ("empty", ""), ("not JSON", "vocab"), ("an array", "[]"), ("truncated", "{\"model\": {\"type\": \"BPE\", \"vocab\": {") })
            yield return RawTokenizerCase(label, text);
        yield return TokenizerCase("model missing", Remove("model"));
        yield return TokenizerCase("model is a string", Set("model", "BPE"));
        foreach (var type in new[] { "Unigram", "WordPiece", "WordLevel", "", "bpe" })
            yield return TokenizerCase($"model type {type}", o => { o["model"]!["type"] = type; return null; });
        yield return TokenizerCase("vocab is an array", o => { o["model"]!["vocab"] = new JsonArray("a", "b"); return null; });
        yield return TokenizerCase("vocab id is a string", o => { o["model"]!["vocab"]!["a"] = "3"; return null; });
        yield return TokenizerCase("vocab id negative", o => { o["model"]!["vocab"]!["a"] = -3; return null; });
        yield return TokenizerCase("vocab id huge", o => { o["model"]!["vocab"]!["a"] = 1 << 30; return null; });
        yield return TokenizerCase("vocab ids duplicated", o => { o["model"]!["vocab"]!["a"] = 4; return null; });
        yield return TokenizerCase("merges with one part", o => { o["model"]!["merges"] = new JsonArray("ab"); return null; });
        yield return TokenizerCase("merges of unknown tokens", o => { o["model"]!["merges"] = new JsonArray("zz qq"); return null; });
        yield return TokenizerCase("merges are numbers", o => { o["model"]!["merges"] = new JsonArray(1, 2); return null; });
        yield return TokenizerCase("merges is an object", o => { o["model"]!["merges"] = new JsonObject(); return null; });
        yield return TokenizerCase("unk_token not in vocab", o => { o["model"]!["unk_token"] = "<unk-missing>"; return null; });
        yield return TokenizerCase("added token without id", o => { o["added_tokens"]![0]!.AsObject().Remove("id"); return null; });
        yield return TokenizerCase("added token id is a string", o => { o["added_tokens"]![0]!["id"] = "0"; return null; });
        yield return TokenizerCase("added token content is null", o => { o["added_tokens"]![0]!["content"] = null; return null; });
        yield return TokenizerCase("added_tokens is an object", Set("added_tokens", new JsonObject()));
        foreach (var part in new[] { "normalizer", "pre_tokenizer", "decoder", "post_processor" })
        {
            yield return TokenizerCase($"{part} of unknown type", Set(part, new JsonObject { ["type"] = "Quantum" }));
            yield return TokenizerCase($"{part} is a number", Set(part, 7));
        }
        foreach (var (label, config) in new[]
        {
            ("not JSON", "{chat_template"), ("an array", "[]"), ("chat_template is a list of named templates", "{\"chat_template\": [{\"name\": \"default\", \"template\": \"{{ messages }}\"}]}"),
            ("chat_template is a number", "{\"chat_template\": 5}"), ("chat_template is empty", "{\"chat_template\": \"\"}"),
            ("chat_template is unparsable Jinja", "{\"chat_template\": \"{% for m in messages %}{{ m['content'] \"}"),
            ("chat_template is huge", "{\"chat_template\": \"" + new string('x', 2_000_000) + "\"}"),
            ("bos_token is a number", "{\"bos_token\": 5}"), ("eos_token unknown", "{\"eos_token\": \"<not-a-token>\"}"),
            ("eos_token object without content", "{\"eos_token\": {\"lstrip\": false}}"), ("add_bos_token is a string", "{\"add_bos_token\": \"yes\"}"),
        })
            yield return TokenizerCase(label, _ => null, config) with { Kind = "tokenizer_config.json", MayLoad = true };

        // adapter_config.json and adapter weights.
        yield return new BadInput("adapter_config.json", "missing", "H3", folder =>
        {
            File.WriteAllBytes(Path.Combine(folder, "adapter_model.safetensors"), Valid.Value.AdapterWeights);
            return folder;
        }, LoadAdapter);
        foreach (var (label, text) in new[] { ("empty", ""), ("not JSON", "r=8"), ("an array", "[]"), ("null", "null") })
            yield return new BadInput("adapter_config.json", label, "H3", folder =>
            {
                File.WriteAllText(Path.Combine(folder, "adapter_config.json"), text);
                File.WriteAllBytes(Path.Combine(folder, "adapter_model.safetensors"), Valid.Value.AdapterWeights);
                return Path.Combine(folder, "adapter_config.json");
            }, LoadAdapter);
        foreach (var (key, v) in new (string, JsonNode?)[] { ("r", 0), ("r", -4), ("r", "8"), ("r", 2.5), ("r", 1 << 30), ("r", null), ("lora_alpha", "x"), ("lora_alpha", null),
                     ("lora_dropout", 1.5), ("lora_dropout", -0.1), ("lora_dropout", "0.1"), ("target_modules", 5), ("target_modules", new JsonArray()),
                     ("target_modules", new JsonArray("no_such_layer")), ("target_modules", new JsonArray(1, 2)), ("peft_type", "PREFIX_TUNING"), ("peft_type", 3),
                     ("bias", "some"), ("use_rslora", "yes"), ("rank_pattern", "x"), ("rank_pattern", new JsonObject { ["q_proj"] = "big" }),
                     ("alpha_pattern", new JsonArray()), ("init_lora_weights", "sideways"), ("modules_to_save", "lm_head"), ("fan_in_fan_out", 2),
                     ("layers_to_transform", "all"), ("use_dora", "maybe") })
            yield return AdapterCase($"{key} = {v?.ToJsonString() ?? "null"}", Set(key, v)) with { Field = key, MayLoad = key == "init_lora_weights" };
        yield return AdapterCase("r smaller than the saved weights", Set("r", 2));
        yield return AdapterCase("r larger than the saved weights", Set("r", 8));
        yield return AdapterWeightsCase("a lora_A with the wrong shape", t => { var k = t.Keys.First(k => k.Contains("lora_A")); t[k] = torch.zeros(3, 3); return t; });
        yield return AdapterWeightsCase("a lora_B missing", t => { t.Remove(t.Keys.First(k => k.Contains("lora_B"))); return t; });
        yield return AdapterWeightsCase("an unexpected key", t => { t["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 32); return t; });
        yield return AdapterWeightsCase("integer weights", t => { var k = t.Keys.First(k => k.Contains("lora_B")); t[k] = torch.zeros(t[k].shape, ScalarType.Int32); return t; });
        yield return AdapterWeightsCase("no tensors", _ => []);
        yield return new BadInput("adapter weights", "only adapter_model.bin (pickle)", "H3", folder =>
        {
            File.WriteAllText(Path.Combine(folder, "adapter_config.json"), Valid.Value.AdapterConfig);
            File.WriteAllBytes(Path.Combine(folder, "adapter_model.bin"), [0x80, 0x02, (byte)'}', .. new byte[64]]);
            return folder;
        }, LoadAdapter);
    }
}
