using LoRAHub.Abstractions;
using LoRAHub.Models;
using LoRAHub.Models.Tokenization;
using LoRAHub.Tuners;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Host.Everyday;

/// <summary>A Hugging Face model folder loaded with its tokenizer: what merge, generate, eval and serve start from.</summary>
public sealed class LoadedModel : IDisposable
{
    private LoadedModel(string folder, ICausalLanguageModel model, Tokenizer tokenizer)
    {
        Folder = folder;
        Model = model;
        Tokenizer = tokenizer;
        ContextLength = ReadContextLength(folder);
    }

    public string Folder { get; }
    public ICausalLanguageModel Model { get; }
    public Tokenizer Tokenizer { get; }

    /// <summary>
    /// Tokens the model was built for (config.json's max_position_embeddings, GPT-2's n_positions): prompt and generated
    /// tokens together beyond it index past GPT-2's position table, and drift past RoPE's trained range; null when unknown.
    /// </summary>
    public int? ContextLength { get; }

    private static int? ReadContextLength(string folder)
    {
        try
        {
            using var config = System.Text.Json.JsonDocument.Parse(File.ReadAllText(Path.Combine(folder, "config.json")));
            var root = config.RootElement;
            // Multimodal folders (Gemma 3) keep the language model's settings under text_config.
            if (root.TryGetProperty("text_config", out var text) && text.ValueKind == System.Text.Json.JsonValueKind.Object) root = text;
            foreach (var key in new[] { "max_position_embeddings", "n_positions" })
                if (root.TryGetProperty(key, out var v) && v.TryGetInt32(out var n) && n > 0) return n;
        }
        catch (Exception e) when (e is IOException or System.Text.Json.JsonException) { }
        return null;
    }

    /// <summary>The folder's last name: what serve lists the base model as.</summary>
    public string Name => Path.GetFileName(Path.TrimEndingDirectorySeparator(Folder));

    /// <param name="dtype">Null: bf16 on CUDA, fp32 on the CPU (CPUs without bf16 units run bf16 GEMMs many times slower).</param>
    public static LoadedModel Load(string folder, Device? device = null, ScalarType? dtype = null)
    {
        var full = Path.GetFullPath(folder);
        if (!Directory.Exists(full)) throw new DirectoryNotFoundException($"model folder not found: {full}");
        CheckNotAdapter(full);
        var dev = device ?? CPU;
        var type = dtype ?? (dev.type == DeviceType.CUDA ? ScalarType.BFloat16 : ScalarType.Float32);
        var tokenizer = Tokenizer.FromFolder(full);
        return new LoadedModel(full, PretrainedModel.Load(full, type, dev), tokenizer);
    }

    /// <summary>
    /// Refuses an adapter folder (adapter_config.json, no config.json) given where a model belongs, naming its base
    /// model from base_model_name_or_path; every command that loads a model comes through <see cref="Load"/>.
    /// </summary>
    /// <exception cref="ArgumentException">The folder is an adapter's.</exception>
    public static void CheckNotAdapter(string folder)
    {
        var full = Path.GetFullPath(folder);
        if (File.Exists(Path.Combine(full, "config.json")) || !File.Exists(Path.Combine(full, AdapterFolder.PeftConfigFile))) return;
        var baseModel = BaseModelOf(full);
        throw new ArgumentException($"{full} is an adapter folder ({AdapterFolder.PeftConfigFile}), not a model; pass its base model" +
            (baseModel is null ? "" : $" (base_model_name_or_path: {baseModel})") +
            $" as the model and the adapter with -a {full} (merge: base model first, then the adapter)");
    }

    /// <summary>adapter_config.json's base_model_name_or_path, or null when it is missing, empty or the file unreadable.</summary>
    private static string? BaseModelOf(string adapterFolder)
    {
        try
        {
            return AdapterFolder.BaseModelName(adapterFolder);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return null;
        }
    }

    /// <summary>float32, bfloat16 or float16 (also fp32, bf16, fp16), as transformers spells torch_dtype.</summary>
    public static ScalarType ParseDType(string text) => text.Trim().ToLowerInvariant() switch
    {
        "float32" or "fp32" => ScalarType.Float32,
        "bfloat16" or "bf16" => ScalarType.BFloat16,
        "float16" or "fp16" or "half" => ScalarType.Float16,
        _ => throw new ArgumentException($"unknown dtype '{text}'; use float32, bfloat16 or float16"),
    };

    public void Dispose() => Model.Dispose();
}
