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
public static partial class PretrainedModel
{
    public static IReadOnlyList<string> SupportedModelTypes => [.. LlamaConfig.SupportedTypes, "gpt2"];

    /// <summary>
    /// The config.json of <paramref name="folder"/>, its model_type checked against what we support before anything is
    /// built (an unsupported one is refused naming it and listing the supported ones).
    /// </summary>
    public static (string json, string modelType, string path) ReadConfig(string folder)
    {
        var configPath = Path.Combine(folder, "config.json");
        if (!File.Exists(configPath)) throw new FileNotFoundException($"{folder} is not a model folder: config.json is missing", configPath);
        var json = File.ReadAllText(configPath);
        string modelType;
        try
        {
            using var doc = JsonDocument.Parse(json);
            if (doc.RootElement.ValueKind != JsonValueKind.Object)
                throw new InvalidDataException($"{configPath}: not a model config (the file holds a JSON {doc.RootElement.ValueKind.ToString().ToLowerInvariant()}, not an object)");
            modelType = !doc.RootElement.TryGetProperty("model_type", out var mt) || mt.ValueKind == JsonValueKind.Null ? ""
                : mt.ValueKind == JsonValueKind.String ? mt.GetString()!
                : throw new InvalidDataException($"{configPath}: 'model_type' is {mt.GetRawText()}; it must be a string such as \"llama\"");
        }
        catch (JsonException e)
        {
            throw new InvalidDataException($"{configPath}: invalid JSON ({e.Message})", e);
        }
        if (!SupportedModelTypes.Contains(modelType))
            throw new NotSupportedException($"{configPath}: model_type '{modelType}' is not supported; supported: {string.Join(", ", SupportedModelTypes)}" +
                (modelType == "gemma3" ? " (for Gemma 3 save the text model, Gemma3ForCausalLM: model_type gemma3_text)" : ""));
        return (json, modelType, configPath);
    }

    /// <summary>A model of config.json's architecture with uninitialised weights (nothing read from the checkpoint).</summary>
    public static ICausalLanguageModel Create(string json, string modelType, string configPath, ScalarType dtype, Device device, string folder) =>
        modelType == "gpt2"
            ? new Gpt2LMHeadModel(Gpt2Config.FromJson(json, configPath), dtype, device, folder)
            : new LlamaForCausalLM(LlamaConfig.FromJson(json, configPath), dtype, device, folder);

    /// <summary>
    /// Builds the architecture named by config.json's model_type and loads its weights tensor by tensor (converted to
    /// dtype, placed on device). Missing, unexpected or wrongly shaped tensors are one error naming each key. The model
    /// comes back in eval mode, as transformers' from_pretrained returns it; call <c>Root.train()</c> to train. A folder
    /// saved in bitsandbytes' 4-bit layout (config.json with quantization_config) loads 4-bit, see <see cref="LoadIn4bit"/>.
    /// </summary>
    public static ICausalLanguageModel Load(string folder, ScalarType dtype = ScalarType.Float32, Device? device = null)
    {
        var (json, modelType, configPath) = ReadConfig(folder);
        // A bitsandbytes 4-bit folder loads as it is stored: 4-bit Linears, the rest in dtype.
        if (BitsAndBytesConfig.FromConfigJson(json, configPath) is not null) return LoadIn4bit(folder, null, dtype, device);
        var model = Create(json, modelType, configPath, dtype, device ?? CPU, folder);
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

    /// <summary>Load for callers that need the Llama-structured type (every family but GPT-2); in eval mode.</summary>
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
        var sources = targets.Keys.ToDictionary(k => k, k => Locate(model, file, k));
        var used = sources.Values.Where(s => s is not null).Select(s => s!.Value.key).ToHashSet();
        // Check everything first so that one error lists every problem.
        var problems = new List<string>();
        foreach (var key in targets.Keys.Where(k => sources[k] is null)) problems.Add($"missing '{key}' (the model expects {ShapeText(targets[key].shape)})");
        foreach (var key in file.Names.Where(k => !used.Contains(k) && !model.IsIgnorableCheckpointKey(k)))
            problems.Add($"unexpected '{key}' {ShapeText(file.Info(key).Shape)}");
        foreach (var (key, target) in targets)
        {
            if (sources[key] is not var (source, offset)) continue;
            var info = file.Info(source);
            var fits = offset == 0 && source == key ? info.Shape.SequenceEqual(target.shape) : offset + target.numel() <= info.Shape.Aggregate(1L, (a, b) => a * b);
            if (!fits)
                problems.Add($"'{source}' has shape {ShapeText(info.Shape)} in the checkpoint but the model expects {ShapeText(target.shape)}" +
                    (source == key ? "" : $" for '{key}' from it"));
        }
        if (problems.Count > 0)
            throw new InvalidDataException($"{folder}: the checkpoint does not match config.json:\n  " + string.Join("\n  ", problems.Take(20)) +
                (problems.Count > 20 ? $"\n  ... and {problems.Count - 20} more" : ""));

        // One tensor at a time, from the mapped file into the parameter: peak host memory is the model plus at most its
        // largest tensor (staged on the host when the dtype or device differs).
        using var _ = no_grad();
        foreach (var (key, target) in targets)
        {
            var (source, offset) = sources[key]!.Value;
            var info = file.Info(source);
            var fileType = SafetensorsTypes.ToTorch(info.DType, folder, source);
            var bytes = file.GetBytes(source);
            var elementBytes = bytes.Length / Math.Max(1, info.Shape.Aggregate(1L, (a, b) => a * b));
            var slice = bytes.Slice(checked((int)(offset * elementBytes)), checked((int)(target.numel() * elementBytes)));
            if (target.device_type == DeviceType.CPU && target.dtype == fileType && target.is_contiguous())
            {
                slice.CopyTo(target.bytes);
                continue;
            }
            using var staged = torchx.frombuffer(slice, target.shape, fileType);
            target.copy_(staged);
        }
    }

    // Where a model key's values are: the same key, or (Mixtral in transformers 5's fused layout) a run of a fused tensor.
    private static (string key, long offset)? Locate(ICausalLanguageModel model, ShardedSafetensors file, string key)
    {
        if (file.Contains(key)) return (key, 0);
        if (model.ModelType == "mixtral" && MixtralCheckpoint.TryLocate(key, k => file.Contains(k) ? file.Info(k).Shape : null, out var source, out var offset))
            return (source, offset);
        return null;
    }

    /// <summary>
    /// Writes config.json and the weights (sharded above maxShardBytes), each file atomically. A model with 4-bit layers is
    /// written as <see cref="SaveIn4bit"/> writes it.
    /// </summary>
    public static void Save(ICausalLanguageModel model, string folder, long maxShardBytes = 2L << 30)
    {
        // 4-bit layers have no dense weight to write: they go in bitsandbytes' layout, which Load reads back.
        if (model.Root.named_modules().Any(m => m.module is LoRAHub.TorchExtensions.Modules.Linear4bit))
        {
            SaveIn4bit(model, folder, null, maxShardBytes);
            return;
        }
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
