using System.Text.Json;
using System.Text.Json.Nodes;
using LoRAHub.TorchExtensions;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Plugins.AdaLoRA;

/// <summary>
/// PEFT's AdaLoRA files: adapter_config.json (peft_type "ADALORA", the schedule, rank_pattern as lists of booleans keyed
/// by "module.lora_E") and adapter_model.safetensors with base_model.model.&lt;path&gt;.lora_A / lora_E / lora_B, pruned
/// to the kept triplets as PEFT's resize_state_dict_by_rank_pattern does.
/// </summary>
internal static class AdaLoraFiles
{
    public const string ConfigFile = "adapter_config.json";
    public const string WeightsFile = "adapter_model.safetensors";
    private const string Prefix = "base_model.model.";

    public static Dictionary<string, Tensor> StateDict(IEnumerable<(string path, SvdLinear layer)> layers, Dictionary<string, bool[]>? pattern)
    {
        var result = new Dictionary<string, Tensor>();
        foreach (var (path, l) in layers)
        {
            Tensor a = l.A, e = l.E, b = l.B;
            if (pattern?.TryGetValue(AdaLoraAdapter.PatternKey(path), out var keep) == true && keep.Count(k => k) != l.Rank)
            {
                var idx = torch.tensor(keep.Select((k, i) => (k, i)).Where(p => p.k).Select(p => (long)p.i).ToArray(), device: l.A.device);
                (a, e, b) = (a.index_select(0, idx), e.index_select(0, idx), b.index_select(1, idx));
            }
            result[$"{Prefix}{path}.lora_A"] = a;
            result[$"{Prefix}{path}.lora_E"] = e;
            result[$"{Prefix}{path}.lora_B"] = b;
        }
        return result;
    }

    public static void Save(string directory, IReadOnlyList<(string path, SvdLinear layer)> layers, AdaLoraOptions o, string baseModel)
    {
        Directory.CreateDirectory(directory);
        using (var scope = torch.NewDisposeScope())
            torchx.save_safetensors(StateDict(layers, o.RankPattern), Path.Combine(directory, WeightsFile), new Dictionary<string, string> { ["format"] = "pt" });
        var config = new JsonObject
        {
            ["peft_type"] = "ADALORA", ["task_type"] = o.TaskType, ["base_model_name_or_path"] = baseModel, ["inference_mode"] = true,
            ["r"] = o.InitR, ["init_r"] = o.InitR, ["target_r"] = o.TargetR, ["lora_alpha"] = o.LoraAlpha, ["lora_dropout"] = o.LoraDropout,
            ["tinit"] = o.Tinit, ["tfinal"] = o.Tfinal, ["deltaT"] = o.DeltaT, ["beta1"] = o.Beta1, ["beta2"] = o.Beta2,
            ["orth_reg_weight"] = o.OrthRegWeight, ["total_step"] = o.TotalStep, ["bias"] = "none", ["fan_in_fan_out"] = false,
            ["init_lora_weights"] = true, ["modules_to_save"] = null,
            ["target_modules"] = new JsonArray(o.EffectiveTargets.Select(t => (JsonNode)JsonValue.Create(t)!).ToArray()),
            ["rank_pattern"] = o.RankPattern is null ? null
                : new JsonObject(o.RankPattern.Select(p => KeyValuePair.Create(p.Key, (JsonNode?)new JsonArray(p.Value.Select(k => (JsonNode)JsonValue.Create(k)).ToArray())))),
        };
        var path = Path.Combine(directory, ConfigFile);
        File.WriteAllText(path + ".tmp", config.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
        File.Move(path + ".tmp", path, overwrite: true);
    }

    /// <summary>The options of a saved adapter; throws naming the file and the fix when it is not an AdaLoRA folder.</summary>
    public static AdaLoraOptions ReadOptions(string directory)
    {
        var path = Path.Combine(directory, ConfigFile);
        if (!File.Exists(path)) throw new FileNotFoundException($"{directory} holds no {ConfigFile}: not a PEFT adapter folder", path);
        JsonNode root;
        try
        {
            root = JsonNode.Parse(File.ReadAllText(path)) ?? throw new InvalidDataException("the file holds null");
        }
        catch (JsonException e)
        {
            throw new InvalidDataException($"{path} is not valid JSON: {e.Message}", e);
        }
        var type = root["peft_type"]?.GetValue<string>();
        if (type != "ADALORA")
            throw new InvalidDataException($"{path} has peft_type \"{type}\", not \"ADALORA\"; load it with the method for that type (e.g. \"lora\")");
        var o = new AdaLoraOptions
        {
            InitR = root["init_r"]?.GetValue<int>() ?? 12, TargetR = root["target_r"]?.GetValue<int>() ?? 8,
            LoraAlpha = root["lora_alpha"]?.GetValue<double>() ?? 8, LoraDropout = root["lora_dropout"]?.GetValue<double>() ?? 0,
            Tinit = root["tinit"]?.GetValue<int>() ?? 0, Tfinal = root["tfinal"]?.GetValue<int>() ?? 0, DeltaT = root["deltaT"]?.GetValue<int>() ?? 1,
            Beta1 = root["beta1"]?.GetValue<double>() ?? 0.85, Beta2 = root["beta2"]?.GetValue<double>() ?? 0.85,
            OrthRegWeight = root["orth_reg_weight"]?.GetValue<double>() ?? 0.5, TotalStep = root["total_step"]?.GetValue<int?>(),
            TaskType = root["task_type"]?.GetValue<string>() ?? "CAUSAL_LM",
            TargetModules = root["target_modules"] is JsonArray list ? list.Select(n => n!.GetValue<string>()).ToList() : null,
        };
        if (root["rank_pattern"] is JsonObject pattern)
            o.RankPattern = pattern.ToDictionary(p => p.Key, p => p.Value!.AsArray().Select(v => v!.GetValue<bool>()).ToArray());
        return o;
    }
}
