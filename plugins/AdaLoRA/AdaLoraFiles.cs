using LoRAHub.Tuners;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Plugins.AdaLoRA;

/// <summary>
/// PEFT's AdaLoRA files: adapter_config.json (peft_type "ADALORA", the options' config fields, rank_pattern as lists of
/// booleans keyed by "module.lora_E") and adapter_model.safetensors with base_model.model.&lt;path&gt;.lora_A / lora_E /
/// lora_B, pruned to the kept triplets as PEFT's resize_state_dict_by_rank_pattern does.
/// </summary>
internal static class AdaLoraFiles
{
    public static Dictionary<string, Tensor> StateDict(IEnumerable<KeyValuePair<string, SvdLinear>> layers, Dictionary<string, bool[]>? pattern)
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
            result[PeftKeys.Parameter($"{path}.lora_A")] = a;
            result[PeftKeys.Parameter($"{path}.lora_E")] = e;
            result[PeftKeys.Parameter($"{path}.lora_B")] = b;
        }
        return result;
    }

    public static void Save(string directory, IEnumerable<KeyValuePair<string, SvdLinear>> layers, AdaLoraOptions o, string baseModel)
    {
        Directory.CreateDirectory(directory);
        using (var scope = torch.NewDisposeScope())
            AdapterWeightsFile.Write(Path.Combine(directory, AdapterWeightsFile.FileName), StateDict(layers, o.RankPattern));
        // PEFT's AdaLoraConfig is a LoraConfig: r is init_r there, and LoRA's other fields are at their defaults.
        ConfigFile.Write(Path.Combine(directory, AdapterFolder.PeftConfigFile), o, ConfigFields.Of(typeof(AdaLoraOptions)), new Dictionary<string, object?>
        {
            ["peft_type"] = "ADALORA", ["base_model_name_or_path"] = baseModel, ["inference_mode"] = true, ["r"] = o.InitR,
            ["bias"] = "none", ["fan_in_fan_out"] = false, ["init_lora_weights"] = true, ["modules_to_save"] = null,
        });
    }

    /// <summary>The options of a saved adapter; throws naming the file and the fix when it is not an AdaLoRA folder.</summary>
    public static AdaLoraOptions ReadOptions(string directory)
    {
        var path = Path.Combine(directory, AdapterFolder.PeftConfigFile);
        using var doc = ConfigFile.Read(path);
        var type = doc.RootElement.TryGetProperty("peft_type", out var t) ? t.GetString() : null;
        if (type != "ADALORA")
            throw new InvalidDataException($"{path} has peft_type \"{type}\", not \"ADALORA\"; load it with the method for that type (e.g. \"lora\")");
        var options = new AdaLoraOptions();
        ConfigFields.ReadFrom(doc.RootElement, options, ConfigFields.Of(typeof(AdaLoraOptions)), path);
        return options;
    }
}
