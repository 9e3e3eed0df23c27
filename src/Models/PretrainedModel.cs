using System.Text.Json;
using LoRAHub.Abstractions;
using LoRAHub.Models.Gpt2;
using LoRAHub.Models.Llama;
using LoRAHub.Safetensors;
using LoRAHub.TorchExtensions;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Models;

/// <summary>Loads and saves Hugging Face model folders: config.json + single or sharded safetensors.</summary>
public static class PretrainedModel
{
    public static IReadOnlyList<string> SupportedModelTypes => [.. LlamaConfig.SupportedTypes, "gpt2"];

    /// <summary>
    /// Builds the architecture named by config.json's model_type and loads its weights tensor by tensor (converted to
    /// dtype, placed on device). Missing, unexpected or wrongly shaped tensors are one error naming each key. The model
    /// comes back in eval mode, as transformers' from_pretrained returns it; call <c>Root.train()</c> to train.
    /// </summary>
    public static ICausalLanguageModel Load(string folder, ScalarType dtype = ScalarType.Float32, Device? device = null)
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
        var dev = device ?? CPU;
        ICausalLanguageModel model = modelType switch
        {
            "gpt2" => new Gpt2LMHeadModel(Gpt2Config.FromJson(json, configPath), dtype, dev, folder),
            _ when LlamaConfig.SupportedTypes.Contains(modelType) => new LlamaForCausalLM(LlamaConfig.FromJson(json, configPath), dtype, dev, folder),
            _ => throw new NotSupportedException($"{configPath}: model_type '{modelType}' is not supported; supported: {string.Join(", ", SupportedModelTypes)}"),
        };
        try
        {
            LoadWeights(model, folder);
            model.Root.eval();
        }
        catch
        {
            model.Dispose();
            throw;
        }
        return model;
    }

    /// <summary>Load for callers that need the Llama type (Llama, Mistral, Qwen2 folders); in eval mode.</summary>
    public static LlamaForCausalLM LoadLlama(string folder, ScalarType dtype = ScalarType.Float32, Device? device = null)
    {
        var model = Load(folder, dtype, device);
        if (model is LlamaForCausalLM llama) return llama;
        model.Dispose();
        throw new NotSupportedException($"{folder} holds a '{model.ModelType}' model, not a Llama-family one");
    }

    private static void LoadWeights(ICausalLanguageModel model, string folder)
    {
        using var file = ShardedSafetensors.Open(folder);
        var targets = model.Root.state_dict();
        // Check everything first so that one error lists every problem.
        var problems = new List<string>();
        foreach (var key in targets.Keys.Where(k => !file.Contains(k))) problems.Add($"missing '{key}' (the model expects {ShapeText(targets[key].shape)})");
        foreach (var key in file.Names.Where(k => !targets.ContainsKey(k) && !model.IsIgnorableCheckpointKey(k)))
            problems.Add($"unexpected '{key}' {ShapeText(file.Info(key).Shape)}");
        foreach (var (key, target) in targets)
        {
            if (!file.Contains(key)) continue;
            var info = file.Info(key);
            if (!info.Shape.SequenceEqual(target.shape))
                problems.Add($"'{key}' has shape {ShapeText(info.Shape)} in the checkpoint but the model expects {ShapeText(target.shape)}");
        }
        if (problems.Count > 0)
            throw new InvalidDataException($"{folder}: the checkpoint does not match config.json:\n  " + string.Join("\n  ", problems.Take(20)) +
                (problems.Count > 20 ? $"\n  ... and {problems.Count - 20} more" : ""));

        // One tensor at a time, from the mapped file into the parameter: peak host memory is the model plus at most its
        // largest tensor (staged on the host when the dtype or device differs).
        using var _ = no_grad();
        foreach (var (key, target) in targets)
        {
            var info = file.Info(key);
            var fileType = SafetensorsTypes.ToTorch(info.DType, folder, key);
            var bytes = file.GetBytes(key);
            if (target.device_type == DeviceType.CPU && target.dtype == fileType && target.is_contiguous())
            {
                bytes.CopyTo(target.bytes);
                continue;
            }
            using var staged = torchx.frombuffer(bytes, info.Shape, fileType);
            target.copy_(staged);
        }
    }

    /// <summary>Writes config.json and the weights (sharded above maxShardBytes), each file atomically.</summary>
    public static void Save(ICausalLanguageModel model, string folder, long maxShardBytes = 2L << 30)
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

    /// <summary>Copies a tensor to the stream through bounded host pieces (tensors may exceed 2 GB, spans may not).</summary>
    private static void WriteTensor(Tensor t, Stream stream)
    {
        const long chunkBytes = 64L << 20;
        using var scope = NewDisposeScope();
        var flat = t.detach().reshape(-1);
        var total = flat.numel();
        var perChunk = Math.Max(1, chunkBytes / t.element_size());
        for (long at = 0; at < total; at += perChunk)
        {
            using var piece = flat.narrow(0, at, Math.Min(perChunk, total - at)).cpu().contiguous();
            stream.Write(piece.bytes);
        }
    }

    private static string ShapeText(long[] shape) => $"[{string.Join(", ", shape)}]";
}
