using System.Text.Json.Serialization;
using LoRAHub.Abstractions;
using LoRAHub.Host.Plugins;
using LoRAHub.Models;
using LoRAHub.Safetensors;
using static TorchSharp.torch;

namespace LoRAHub.Host.Everyday;

/// <summary>What <see cref="AdapterMerge.Run"/> wrote.</summary>
public sealed record MergeResult(string Output, string Method, [property: JsonPropertyName("dtype")] string DType, long Parameters, IReadOnlyList<string> Files);

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
    /// <remarks>
    /// The output is checked before anything loads: it must not be, hold or lie inside the base model's or the adapter's
    /// folder, nor be a file. The merged model is written to a hidden folder beside it and moved into place once complete,
    /// so a failure half-way leaves no half-written output (and --force replaces files only then).
    /// </remarks>
    public static MergeResult Run(IMethodRegistry methods, string baseModel, string adapterFolder, string output,
        Device? device = null, ScalarType? dtype = null, bool force = false)
    {
        var outputFull = Path.TrimEndingDirectorySeparator(Path.GetFullPath(output));
        CheckOutput(outputFull, baseModel, adapterFolder, force);
        var adapterFull = Path.GetFullPath(adapterFolder);
        if (!Directory.Exists(adapterFull)) throw new DirectoryNotFoundException($"adapter folder not found: {adapterFull}");
        var method = methods.ForFolder(adapterFull);
        var staging = CreateStaging(outputFull);
        try
        {
            string dtypeName;
            long parameters;
            using (var loaded = LoadedModel.Load(baseModel, device, dtype))
            {
                var adapter = method.Load(loaded.Model, adapterFull);
                if (!adapter.CanMerge)
                {
                    adapter.Dispose();
                    throw new NotSupportedException($"{method.Name} adapters cannot be merged into the base weights (e.g. MALoRA routes per token); serve or generate with the adapter instead");
                }
                var merged = adapter.MergeAndUnload<ICausalLanguageModel>();
                PretrainedModel.Save(merged, staging);
                foreach (var name in CopiedFiles)
                {
                    var from = Path.Combine(loaded.Folder, name);
                    if (File.Exists(from)) File.Copy(from, Path.Combine(staging, name), overwrite: true);
                }
                (dtypeName, parameters) = (merged.DType.ToString(), merged.Root.parameters().Sum(p => p.numel()));
                adapter.Dispose();
            }
            Commit(staging, outputFull);
            return new MergeResult(outputFull, method.Name, dtypeName, parameters,
                Directory.GetFiles(outputFull).Select(Path.GetFileName).OfType<string>().Order(StringComparer.Ordinal).ToList());
        }
        finally
        {
            // Best effort: the merge's own exception matters more than leftovers of a hidden folder.
            try { if (Directory.Exists(staging)) Directory.Delete(staging, recursive: true); }
            catch (IOException) { }
            catch (UnauthorizedAccessException) { }
        }
    }

    /// <summary>Refuses an output that would overwrite what the merge reads, or that is not a folder we can write.</summary>
    private static void CheckOutput(string outputFull, string baseModel, string adapterFolder, bool force)
    {
        var outputReal = FolderPaths.Canonical(outputFull);
        foreach (var (folder, what, reads) in new[] { (baseModel, "the base model's folder", "the weights"), (adapterFolder, "the adapter folder", "the adapter") })
        {
            var real = FolderPaths.Canonical(folder);
            // Even with --force: the merge would replace files while it still reads them, and a second run would merge twice.
            var problem = outputReal.Equals(real, FolderPaths.Comparison) ? $"is {what}; merging would overwrite {reads} it is read from"
                : FolderPaths.IsSameOrInside(outputReal, real) ? $"lies inside {what} {real}; merging would write among {reads} it is read from"
                : FolderPaths.IsSameOrInside(real, outputReal) ? $"holds {what} {real}; the merged model would share a folder with {reads} it is read from"
                : null;
            if (problem != null) throw new ArgumentException($"-o {outputFull} {problem}. Choose another output folder.");
        }
        if (File.Exists(outputFull))
            throw new IOException($"-o {outputFull} is a file, not a folder; name a folder for the merged model (it is created when missing).");
        if (Directory.Exists(outputFull) && Directory.EnumerateFileSystemEntries(outputFull).Any() && !force)
            throw new IOException($"output folder {outputFull} is not empty; choose another or pass --force");
    }

    /// <summary>The hidden folder beside the output that the merged model is written to; creating it proves the place is writable.</summary>
    private static string CreateStaging(string outputFull)
    {
        var parent = Path.GetDirectoryName(outputFull)
            ?? throw new ArgumentException($"-o {outputFull} is a root folder; name a folder for the merged model.");
        var staging = Path.Combine(parent, $".{Path.GetFileName(outputFull)}.merging-{Guid.NewGuid():N}");
        var (where, making) = (parent, false);
        try
        {
            Directory.CreateDirectory(parent);
            // Files are moved into an existing output at the end: check now that it takes them.
            if (Directory.Exists(outputFull))
            {
                where = outputFull;
                using (File.Create(Path.Combine(outputFull, $".lorahub-write-check-{Guid.NewGuid():N}"), 1, FileOptions.DeleteOnClose)) { }
            }
            (where, making) = (parent, true);
            Directory.CreateDirectory(staging);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            // .NET's message would name the hidden staging folder, which the user never asked for.
            var reason = e is UnauthorizedAccessException ? $"no permission to write in {where}"
                : making ? $"{where} does not take new folders" : e.Message.TrimEnd('.');
            throw new IOException($"cannot write the output folder {outputFull}: {reason}; choose a folder you can write to with -o.", e);
        }
        return staging;
    }

    /// <summary>
    /// Moves the complete merged model into place: a missing or empty output becomes the staging folder in one rename;
    /// into a non-empty one (--force) the files move one by one, the shard index last, then weight files of an earlier
    /// save in the other layout are removed (as <see cref="SafetensorsWriter.WriteSharded"/> does) so none is mistaken
    /// for part of this model. Other files there stay.
    /// </summary>
    private static void Commit(string staging, string outputFull)
    {
        if (Directory.Exists(outputFull) && !Directory.EnumerateFileSystemEntries(outputFull).Any()) Directory.Delete(outputFull);
        if (!Directory.Exists(outputFull))
        {
            Directory.Move(staging, outputFull);
            return;
        }
        var written = Directory.GetFiles(staging).Select(f => Path.GetFileName(f)!).ToHashSet(StringComparer.Ordinal);
        foreach (var name in written.OrderBy(n => n == ShardedSafetensors.IndexFileName).ThenBy(n => n, StringComparer.Ordinal))
            File.Move(Path.Combine(staging, name), Path.Combine(outputFull, name), overwrite: true);
        foreach (var path in Directory.GetFiles(outputFull))
        {
            var name = Path.GetFileName(path);
            var weights = name == SafetensorsWriter.SingleFileName || name == ShardedSafetensors.IndexFileName || SafetensorsWriter.IsShardFileName(name);
            if (weights && !written.Contains(name)) File.Delete(path);
        }
    }
}
