using LoRAHub.Abstractions;
using LoRAHub.Host.Plugins;
using LoRAHub.Models;
using static TorchSharp.torch;

namespace LoRAHub.Host.Everyday;

/// <summary>What <see cref="AdapterMerge.Run"/> wrote.</summary>
public sealed record MergeResult(string Output, string Method, string DType, long Parameters, IReadOnlyList<string> Files);

/// <summary>
/// The <c>merge</c> command's work, callable from scripts: base model + saved adapter → an ordinary Hugging Face folder
/// (PEFT's merge_and_unload, then save_pretrained), with the base's tokenizer files copied beside it, so transformers
/// and every LoRAHub command load it as they load the base.
/// </summary>
public static class AdapterMerge
{
    /// <summary>Tokenizer and generation files copied from the base folder when present.</summary>
    public static readonly IReadOnlyList<string> CopiedFiles =
        ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "chat_template.jinja"];

    /// <param name="force">Write into an output folder that already has files (those of the same names are replaced).</param>
    public static MergeResult Run(IMethodRegistry methods, string baseModel, string adapterFolder, string output,
        Device? device = null, ScalarType? dtype = null, bool force = false)
    {
        var outputFull = Path.GetFullPath(output);
        if (Directory.Exists(outputFull) && Directory.EnumerateFileSystemEntries(outputFull).Any() && !force)
            throw new IOException($"output folder {outputFull} is not empty; choose another or pass --force");
        var adapterFull = Path.GetFullPath(adapterFolder);
        if (!Directory.Exists(adapterFull)) throw new DirectoryNotFoundException($"adapter folder not found: {adapterFull}");
        var method = methods.ForFolder(adapterFull);

        using var loaded = LoadedModel.Load(baseModel, device, dtype);
        var adapter = method.Load(loaded.Model, adapterFull);
        if (!adapter.CanMerge)
        {
            adapter.Dispose();
            throw new NotSupportedException($"{method.Name} adapters cannot be merged into the base weights (e.g. MALoRA routes per token); serve or generate with the adapter instead");
        }
        var merged = adapter.MergeAndUnload<ICausalLanguageModel>();
        PretrainedModel.Save(merged, outputFull);
        foreach (var name in CopiedFiles)
        {
            var from = Path.Combine(loaded.Folder, name);
            if (File.Exists(from)) File.Copy(from, Path.Combine(outputFull, name), overwrite: true);
        }
        var parameters = merged.Root.parameters().Sum(p => p.numel());
        adapter.Dispose();
        return new MergeResult(outputFull, method.Name, merged.DType.ToString(), parameters,
            Directory.GetFiles(outputFull).Select(Path.GetFileName).OfType<string>().Order(StringComparer.Ordinal).ToList());
    }
}
