using System.Text.Json.Nodes;
using LoRAHub.Abstractions;
using LoRAHub.Models.Llama;
using LoRAHub.Safetensors;
using LoRAHub.TorchExtensions;
using LoRAHub.TorchExtensions.Modules;
using LoRAHub.TorchExtensions.Quantization;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoRAHub.Models;

/// <summary>What <see cref="PretrainedModel.LoadIn4bit"/> did: layers, bytes read, and the most checkpoint bytes held in host memory at once.</summary>
public sealed record FourBitLoadReport(int QuantizedLayers, bool PreQuantized, long CheckpointBytes, long PeakStagedHostBytes, long FourBitBytes);

public static partial class PretrainedModel
{
    /// <summary>
    /// transformers' from_pretrained with a 4-bit BitsAndBytesConfig, without ever holding the dense model: the model is
    /// built on the meta device (no memory), then the checkpoint is read tensor by tensor in file order; each Linear
    /// weight (all but the output head and skip modules) goes to <paramref name="device"/>, is quantized there and freed,
    /// and every other tensor is placed in <paramref name="dtype"/>. Peak host memory is about one checkpoint tensor,
    /// peak device memory the 4-bit model plus one dense weight. A folder whose config.json has a bitsandbytes 4-bit
    /// quantization_config (saved by transformers, or by <see cref="SaveIn4bit"/>) is read as it is stored, nothing
    /// quantized again; <paramref name="quantization"/> is then ignored. The model comes back in eval mode.
    /// </summary>
    /// <param name="dtype">The dense parts' dtype (embeddings, norms, head); default the compute dtype.</param>
    public static ICausalLanguageModel LoadIn4bit(string folder, BitsAndBytesConfig? quantization = null, ScalarType? dtype = null,
        Device? device = null, Action<FourBitLoadReport>? report = null)
    {
        var (json, modelType, configPath) = ReadConfig(folder);
        if (modelType == "gpt2")
            throw new NotSupportedException($"{folder}: 4-bit loading covers the Llama-structured families; load GPT-2 with Load and let QLoRA quantize it");
        var stored = BitsAndBytesConfig.FromConfigJson(json, configPath);
        var q = stored ?? quantization ?? new BitsAndBytesConfig();
        var dev = device ?? CPU;
        var denseType = dtype ?? q.Bnb4bitComputeDtype;
        if (dev.type == DeviceType.CUDA && !torch.cuda.is_available()) throw new InvalidOperationException($"device {dev} asked for but CUDA is not available");
        var model = Create(json, modelType, configPath, denseType, META, folder);
        try
        {
            using var reader = CheckpointReader.Open(folder);
            var result = Fill(model, reader, q, stored is not null, denseType, dev);
            report?.Invoke(result);
            model.Root.eval();
            return model;
        }
        catch
        {
            model.Dispose();
            throw;
        }
    }

    private static FourBitLoadReport Fill(ICausalLanguageModel model, CheckpointReader reader, BitsAndBytesConfig q, bool preQuantized,
        ScalarType denseType, Device device)
    {
        var root = model.Root;
        var heads = model.OutputModuleNames.ToHashSet();
        var modules = root.named_modules().Where(m => m.name.Length > 0).ToList();
        var linears = modules.Where(m => m.module is Linear && !heads.Contains(m.name) && !q.Skips(m.name)).Select(m => m.name).ToList();
        var linearSet = linears.ToHashSet();
        // Modules holding tensors of their own, other than the quantized Linears: rebuilt on the device.
        var dense = modules.Where(m => !linearSet.Contains(m.name) && (m.module.named_parameters(recurse: false).Any() || m.module.named_buffers(recurse: false).Any()))
            .Select(m => m.name).ToList();

        // Every key is checked before anything is read, so one error lists every problem.
        (string key, long offset)? Where(string key)
        {
            if (reader.Contains(key)) return (key, 0);
            if (model.ModelType == "mixtral" && MixtralCheckpoint.TryLocate(key, k => reader.Contains(k) ? reader.Shape(k) : null, out var source, out var offset))
                return (source, offset);
            return null;
        }
        var used = new HashSet<string>(StringComparer.Ordinal);
        var problems = new List<string>();
        void Need(string key)
        {
            if (Where(key) is { } w) used.Add(w.key);
            else problems.Add($"missing '{key}'");
        }
        foreach (var path in linears)
        {
            var linear = (Linear)root.get_submodule(path)!;
            Need(path + ".weight");
            if (preQuantized)
                foreach (var suffix in QuantizedSuffixes(q)) Need(path + ".weight" + suffix);
            if (linear.bias is not null) Need(path + ".bias");
        }
        foreach (var path in dense)
            foreach (var (name, _) in root.get_submodule(path)!.named_parameters(recurse: false)) Need($"{path}.{name}");
        foreach (var key in reader.Names.Where(k => !used.Contains(k) && !model.IsIgnorableCheckpointKey(k))) problems.Add($"unexpected '{key}'");
        if (problems.Count > 0)
            throw new InvalidDataException($"{reader.Folder}: the checkpoint does not match config.json{(preQuantized ? " and its 4-bit quantization_config" : "")}:\n  " +
                string.Join("\n  ", problems.Take(20)) + (problems.Count > 20 ? $"\n  ... and {problems.Count - 20} more" : ""));

        using var _ = no_grad();
        long fourBitBytes = 0;
        // In file order, so the disk is read front to back.
        foreach (var path in linears.OrderBy(p => reader.Order(Where(p + ".weight")!.Value.key)))
        {
            var old = (Linear)root.get_submodule(path)!;
            FourBitTensor w;
            if (preQuantized) w = ReadFourBit(reader, path + ".weight", q, device);
            else
            {
                var (key, offset) = Where(path + ".weight")!.Value;
                var weight = reader.Read(key, device, null, offset, old.weight!.shape);
                try
                {
                    w = FourBit.Quantize(weight, q.Bnb4bitQuantType, q.Blocksize, q.Bnb4bitUseDoubleQuant);
                }
                finally
                {
                    reader.Release(weight);
                }
            }
            Tensor? bias = old.bias is null ? null : reader.Keep(reader.Read(path + ".bias", device, denseType));
            var layer = new Linear4bit(w, bias, q.Bnb4bitComputeDtype);
            fourBitBytes += layer.weight_bytes;
            root.replace_submodule(path, layer);
            old.Dispose();
        }
        foreach (var path in dense)
        {
            var old = root.get_submodule(path)!;
            var fresh = Rebuild(old, path, denseType, device);
            foreach (var (name, p) in fresh.named_parameters(recurse: false))
            {
                var (key, offset) = Where($"{path}.{name}")!.Value;
                var value = reader.Read(key, device, denseType, offset, p.shape);
                p.copy_(value);
                reader.Release(value);
            }
            root.replace_submodule(path, fresh);
            old.Dispose();
        }
        var left = root.named_parameters().Select(p => (p.name, t: (Tensor)p.parameter)).Concat(root.named_buffers().Select(b => (b.name, t: b.buffer)))
            .Where(p => p.t.device_type == DeviceType.META).Select(p => p.name).ToList();
        if (left.Count > 0) throw new InvalidOperationException($"4-bit loading left tensors unmaterialized (a module type it cannot rebuild): {string.Join(", ", left.Take(10))}");
        root.DetachParametersFromDisposeScope();
        return new FourBitLoadReport(linears.Count, preQuantized, reader.TotalBytes, reader.PeakStagedBytes, fourBitBytes);
    }

    private static IEnumerable<string> QuantizedSuffixes(BitsAndBytesConfig q) =>
        q.Bnb4bitUseDoubleQuant
            ? [".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", BitsAndBytesFormat.QuantStateSuffix(q.Bnb4bitQuantType)]
            : [".absmax", ".quant_map", BitsAndBytesFormat.QuantStateSuffix(q.Bnb4bitQuantType)];

    private static FourBitTensor ReadFourBit(CheckpointReader reader, string key, BitsAndBytesConfig q, Device device)
    {
        var parts = new List<Tensor>();
        Tensor Part(string suffix)
        {
            var t = reader.Read(key + suffix, CPU);
            parts.Add(t);
            return t;
        }
        try
        {
            var nested = q.Bnb4bitUseDoubleQuant;
            return BitsAndBytesFormat.Read(key, Part(""), Part(".absmax"), Part(".quant_map"), nested ? Part(".nested_absmax") : null,
                nested ? Part(".nested_quant_map") : null, Part(BitsAndBytesFormat.QuantStateSuffix(q.Bnb4bitQuantType)), device);
        }
        finally
        {
            foreach (var t in parts) reader.Release(t);
        }
    }

    // The dense module types of our decoders, made again on the device (their meta tensors cannot be moved).
    private static nn.Module Rebuild(nn.Module old, string path, ScalarType dtype, Device device) => old switch
    {
        Embedding e => nn.Embedding(e.weight!.size(0), e.weight.size(1), device: device, dtype: dtype),
        Linear l => nn.Linear(l.in_features, l.out_features, l.bias is not null, device, dtype),
        LoRAHub.TorchExtensions.Modules.RMSNorm r => torchx.nn.RMSNorm(r.normalized_shape, r.eps, dtype, device),
        GemmaRMSNorm g => new GemmaRMSNorm(g.weight.size(0), g.eps, dtype, device),
        _ => throw new NotSupportedException($"4-bit loading cannot rebuild '{path}' ({old.GetType().Name}) on {device}"),
    };

    /// <summary>
    /// Writes the model as transformers saves a bitsandbytes 4-bit model: config.json with quantization_config, every
    /// Linear (but the output head and skip modules) in bitsandbytes' serialized 4-bit layout (a <see cref="Linear4bit"/> as
    /// it is, a dense Linear quantized first, e.g. a QLoRA model after MergeAndUnload), everything else dense. The folder
    /// loads with <see cref="Load"/> / <see cref="LoadIn4bit"/> here and with transformers + bitsandbytes.
    /// </summary>
    public static void SaveIn4bit(ICausalLanguageModel model, string folder, BitsAndBytesConfig? quantization = null, long maxShardBytes = 2L << 30)
    {
        var root = model.Root;
        var existing = root.named_modules().Select(m => m.module).OfType<Linear4bit>().FirstOrDefault();
        var q = quantization ?? (existing is null ? new BitsAndBytesConfig()
            : new BitsAndBytesConfig { Bnb4bitQuantType = existing.quant_type, Bnb4bitUseDoubleQuant = existing.double_quant, Bnb4bitComputeDtype = existing.compute_dtype, Blocksize = existing.blocksize });
        if (q.Blocksize != 64) throw new NotSupportedException($"bitsandbytes' 4-bit layout in transformers uses blocksize 64, not {q.Blocksize}");
        var heads = model.OutputModuleNames.ToHashSet();
        var entries = new List<SafetensorsEntry>();
        var quantizedPaths = new HashSet<string>(StringComparer.Ordinal);
        var owned = new List<Tensor>();
        try
        {
            foreach (var (path, module) in root.named_modules())
            {
                if (heads.Contains(path) || q.Skips(path)) continue;
                FourBitTensor? w = null;
                var own = false;
                if (module is Linear4bit l4)
                {
                    if (l4.quant_type != q.Bnb4bitQuantType || l4.double_quant != q.Bnb4bitUseDoubleQuant || l4.blocksize != q.Blocksize)
                        throw new InvalidOperationException($"'{path}' is {l4.quant_type}{(l4.double_quant ? "+dq" : "")} (blocksize {l4.blocksize}) but the folder is written as {q.Bnb4bitQuantType}{(q.Bnb4bitUseDoubleQuant ? "+dq" : "")}");
                    w = l4.quantized_weight;
                }
                else if (module is Linear dl)
                {
                    using var __ = no_grad();
                    w = FourBit.Quantize(dl.weight!, q.Bnb4bitQuantType, q.Blocksize, q.Bnb4bitUseDoubleQuant);
                    own = true;
                }
                if (w is null) continue;
                quantizedPaths.Add(path);
                foreach (var (suffix, t) in BitsAndBytesFormat.Write(w, model.DType))
                {
                    owned.Add(t);
                    entries.Add(Entry($"{path}.weight{suffix}", t));
                }
                if (own) w.Dispose();
            }
            foreach (var (key, t) in root.state_dict())
            {
                var dot = key.LastIndexOf('.');
                var owner = dot < 0 ? "" : key[..dot];
                if (quantizedPaths.Contains(owner) && key[(dot + 1)..] != "bias") continue; // written above
                entries.Add(Entry(key, t));
            }
            Directory.CreateDirectory(folder);
            var config = JsonNode.Parse(model.ConfigJson())!.AsObject();
            config["quantization_config"] = q.ToJson();
            var configPath = Path.Combine(folder, "config.json");
            File.WriteAllText(configPath + ".tmp", config.ToJsonString(new System.Text.Json.JsonSerializerOptions { WriteIndented = true }));
            File.Move(configPath + ".tmp", configPath, overwrite: true);
            SafetensorsWriter.WriteSharded(folder, entries, maxShardBytes);
        }
        finally
        {
            foreach (var t in owned) t.Dispose();
        }
    }

    private static SafetensorsEntry Entry(string key, Tensor t) =>
        new(key, SafetensorsTypes.ToFile(t.dtype), t.shape, t.numel() * t.element_size(), stream => WriteTensor(t, stream));
}
