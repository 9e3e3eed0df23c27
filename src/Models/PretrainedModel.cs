using System.Text.Json;
using LoRAHub.Models.Gpt2;
using LoRAHub.Models.Llama;
using LoRAHub.Safetensors;
using LoRAHub.Torch;

namespace LoRAHub.Models;

/// <summary>Loads and saves Hugging Face model folders: config.json + single or sharded safetensors.</summary>
public static class PretrainedModel
{
    public static IReadOnlyList<string> SupportedModelTypes => [.. LlamaConfig.SupportedTypes, "gpt2"];

    /// <summary>
    /// Builds the architecture named by config.json's model_type and loads its weights tensor by tensor (converted to
    /// dtype, placed on device). Missing, unexpected or wrongly shaped tensors are one error naming each key.
    /// </summary>
    public static ICausalLM Load(string folder, ScalarType dtype = ScalarType.Float32, Device? device = null)
    {
        var configPath = Path.Combine(folder, "config.json");
        if (!File.Exists(configPath)) throw new FileNotFoundException($"{folder} is not a model folder: config.json is missing", configPath);
        var json = File.ReadAllText(configPath);
        string modelType;
        try
        {
            using var doc = JsonDocument.Parse(json);
            modelType = doc.RootElement.TryGetProperty("model_type", out var mt) ? mt.GetString() ?? "" : "";
        }
        catch (JsonException e)
        {
            throw new InvalidDataException($"{configPath}: invalid JSON ({e.Message})", e);
        }
        var dev = device ?? Device.CPU;
        ICausalLM model = modelType switch
        {
            "gpt2" => new Gpt2LMHeadModel(Gpt2Config.FromJson(json, configPath), dtype, dev, folder),
            _ when LlamaConfig.SupportedTypes.Contains(modelType) => new LlamaForCausalLM(LlamaConfig.FromJson(json, configPath), dtype, dev, folder),
            _ => throw new NotSupportedException($"{configPath}: model_type '{modelType}' is not supported; supported: {string.Join(", ", SupportedModelTypes)}"),
        };
        try
        {
            LoadWeights(model, folder, dtype, dev);
        }
        catch
        {
            model.Dispose();
            throw;
        }
        return model;
    }

    /// <summary>Load for callers that need the Llama type (Llama, Mistral, Qwen2 folders).</summary>
    public static LlamaForCausalLM LoadLlama(string folder, ScalarType dtype = ScalarType.Float32, Device? device = null)
    {
        var model = Load(folder, dtype, device);
        if (model is LlamaForCausalLM llama) return llama;
        model.Dispose();
        throw new NotSupportedException($"{folder} holds a '{model.ModelType}' model, not a Llama-family one");
    }

    private static void LoadWeights(ICausalLM model, string folder, ScalarType dtype, Device device)
    {
        using var file = ShardedSafetensors.Open(folder);
        var targets = model.Root.state_dict();
        // Check everything first so that one error lists every problem.
        var problems = new List<string>();
        foreach (var key in targets.Keys.Where(k => !file.Contains(k))) problems.Add($"missing '{key}' (the model expects {targets[key].ShapeString})");
        foreach (var key in file.Names.Where(k => !targets.ContainsKey(k) && !model.IsIgnorableCheckpointKey(k)))
            problems.Add($"unexpected '{key}' [{string.Join(", ", file.Info(key).Shape)}]");
        foreach (var (key, target) in targets)
        {
            if (!file.Contains(key)) continue;
            var info = file.Info(key);
            if (!info.Shape.SequenceEqual(target.shape))
                problems.Add($"'{key}' has shape [{string.Join(", ", info.Shape)}] in the checkpoint but the model expects {target.ShapeString}");
        }
        if (problems.Count > 0)
            throw new InvalidDataException($"{folder}: the checkpoint does not match config.json:\n  " + string.Join("\n  ", problems.Take(20)) +
                (problems.Count > 20 ? $"\n  ... and {problems.Count - 20} more" : ""));

        // One tensor at a time: peak memory is the model plus its largest tensor.
        using var _ = torch.no_grad();
        foreach (var (key, target) in targets)
        {
            using var scope = torch.NewDisposeScope();
            var info = file.Info(key);
            var loaded = torch.frombuffer(file.GetBytes(key), info.Shape, SafetensorsTypes.ToTorch(info.DType, folder, key), device);
            target.copy_(loaded.dtype == target.dtype ? loaded : loaded.to(target.dtype));
        }
    }

    /// <summary>Writes config.json and the weights (sharded above maxShardBytes), each file atomically.</summary>
    public static void Save(ICausalLM model, string folder, long maxShardBytes = 2L << 30)
    {
        Directory.CreateDirectory(folder);
        var configPath = Path.Combine(folder, "config.json");
        File.WriteAllText(configPath + ".tmp", model.ConfigJson());
        File.Move(configPath + ".tmp", configPath, overwrite: true);
        var entries = model.Root.state_dict().Select(kv =>
        {
            var t = kv.Value;
            var bytes = t.numel() * t.element_size();
            return new SafetensorsEntry(kv.Key, SafetensorsTypes.ToFile(t.dtype), t.shape, bytes, stream => WriteTensor(t, stream));
        });
        SafetensorsWriter.WriteSharded(folder, entries, maxShardBytes);
    }

    /// <summary>Copies a tensor to the stream through a bounded host buffer (tensors may exceed 2 GB, arrays may not).</summary>
    private static void WriteTensor(Tensor t, Stream stream)
    {
        const long chunkBytes = 64L << 20;
        using var scope = torch.NewDisposeScope();
        var flat = t.detach().reshape(-1);
        var total = flat.numel();
        var perChunk = Math.Max(1, chunkBytes / t.element_size());
        var buffer = new byte[Math.Min(total, perChunk) * t.element_size()];
        for (long at = 0; at < total; at += perChunk)
        {
            var n = Math.Min(perChunk, total - at);
            using var piece = flat.narrow(0, at, n);
            var span = buffer.AsSpan(0, (int)(n * t.element_size()));
            piece.CopyTo(span);
            stream.Write(span);
        }
    }
}
