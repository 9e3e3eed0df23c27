using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions;

/// <summary>Finds the Linear layers (dense or quantized) an adapter method targets by module name.</summary>
public static class LinearTargets
{
    /// <summary>
    /// Paths of the Linear-like modules (<see cref="LinearLayer.IsLinear"/>) under <paramref name="root"/> whose path equals a
    /// name or ends with "." + name (PEFT's rule), leaving out <paramref name="exclude"/> (e.g. output heads); and every such
    /// path, to name in errors.
    /// </summary>
    public static (List<string> matches, List<string> linears) Match(nn.Module root, IEnumerable<string> names, IEnumerable<string> exclude)
    {
        var excluded = exclude.ToHashSet();
        var wanted = names.ToList();
        var linears = root.named_modules().Where(m => m.name.Length > 0 && LinearLayer.IsLinear(m.module) && !excluded.Contains(m.name))
            .Select(m => m.name).ToList();
        var matches = linears.Where(p => wanted.Any(n => p == n || p.EndsWith("." + n, StringComparison.Ordinal))).ToList();
        return (matches, linears);
    }

    /// <summary>"a, b, c, ..." for error messages: the first dozen Linear paths.</summary>
    public static string Describe(IReadOnlyList<string> linears) => string.Join(", ", linears.Take(12)) + (linears.Count > 12 ? ", ..." : "");
}
