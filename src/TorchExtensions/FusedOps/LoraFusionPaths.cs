using System.Runtime.CompilerServices;
using System.Text.RegularExpressions;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions;

/// <summary>
/// Which path each block took on its last forward (fused, or composite and why), for benchmarks and logs: the fused
/// LoRA blocks (<see cref="LoraFusion"/>) record it per block module, <see cref="Report"/> names them.
/// </summary>
public static partial class LoraFusionPaths
{
    private static readonly ConditionalWeakTable<nn.Module, Entry> paths = new();

    private sealed record Entry(string Kind, string Path);

    /// <summary>Records that <paramref name="block"/> (a block of <paramref name="kind"/>, e.g. "mlp") took the fused path (reason null) or the composite one.</summary>
    public static void Record(nn.Module block, string kind, string? compositeReason) =>
        paths.AddOrUpdate(block, new Entry(kind, compositeReason is null ? "fused" : $"composite ({compositeReason})"));

    /// <summary>
    /// Whether the fused LoRA MLPs ran their low-rank updates inside the SwiGLU kernels on tensor cores (LoraMlpKernels):
    /// their launches so far, or why they are off. The blocks' paths say "fused" either way.
    /// </summary>
    public static string MlpLowRankKernels => LoraMlpKernels.Report;

    /// <summary>
    /// Whether the fused blocks' backward took each projection's dxa and B gradient from one read of dy (LowRankKernels):
    /// their launches so far, or why they are off.
    /// </summary>
    public static string BackwardLowRankKernels => LowRankKernels.Report;

    /// <summary>
    /// Whether the fused MLP blocks added down_proj's update, DoRA row scale and the decoder's residual in one kernel after
    /// the base GEMM (<see cref="LoraDownResidualKernels"/>, LORAHUB_DOWN_RESIDUAL_EPILOGUE): its launches so far, or why off.
    /// </summary>
    public static string MlpResidualKernel => LoraDownResidualKernels.Report;

    /// <summary>
    /// Whether the fused q/k/v blocks ran their frozen bases as one stacked GEMM each way (<see cref="StackedBases"/>,
    /// LORAHUB_QKV_STACKED_BASE): the stacked GEMMs so far, or why off; with the reason the last unstacked call gave.
    /// </summary>
    public static string StackedQkvBases => StackedBases.Report;

    /// <summary>The path <paramref name="block"/> took on its last forward ("fused", "composite (why)"), or null if never recorded.</summary>
    public static string? Of(nn.Module block) => paths.TryGetValue(block, out var e) ? e.Path : null;

    /// <summary>
    /// One line over the named modules (e.g. model.named_modules()): per kind and path, how many blocks and which layers,
    /// e.g. "qkv: composite (q_proj: dropout 0.05) n=16 [0-15]; mlp: fused n=16 [0-15]". Empty when none recorded.
    /// </summary>
    public static string Report(IEnumerable<(string name, nn.Module module)> modules)
    {
        var rows = new List<(string kind, string path, string name)>();
        foreach (var (name, module) in modules)
            if (paths.TryGetValue(module, out var e)) rows.Add((e.Kind, e.Path, name));
        return string.Join("; ", rows.GroupBy(r => r.kind).Select(kind =>
            $"{kind.Key}: " + string.Join(", ", kind.GroupBy(r => r.path).Select(p => $"{p.Key} n={p.Count()} [{Layers(p.Select(r => r.name))}]"))));
    }

    // Layer indices (the last ".N." in each name) as ranges, e.g. "0-7,9"; names without one as they are.
    private static string Layers(IEnumerable<string> names)
    {
        var indices = new List<int>();
        var others = new List<string>();
        foreach (var n in names)
        {
            var m = LayerIndex().Matches(n);
            if (m.Count > 0) indices.Add(int.Parse(m[^1].Groups[1].Value));
            else others.Add(n);
        }
        indices.Sort();
        var ranges = new List<string>();
        for (var i = 0; i < indices.Count;)
        {
            var j = i;
            while (j + 1 < indices.Count && indices[j + 1] == indices[j] + 1) j++;
            ranges.Add(i == j ? $"{indices[i]}" : $"{indices[i]}-{indices[j]}");
            i = j + 1;
        }
        return string.Join(",", ranges.Concat(others));
    }

    [GeneratedRegex(@"(?:^|\.)(\d+)(?:\.|$)")]
    private static partial Regex LayerIndex();
}
