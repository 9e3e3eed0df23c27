using System.Security.Cryptography;

namespace LoRAHub.Reliability.Tests.Corpus;

/// <summary>Runs bad inputs with a timeout and judges each outcome: handled, loaded (where allowed), unclear, hang or modified.</summary>
public static class CorpusRunner
{
    public enum Verdict { Handled, Loaded, Unclear, Hang, Modified }

    public sealed record Outcome(BadInput Case, Verdict Verdict, string Detail);

    /// <summary>Exception types that mean the reader failed to check its input rather than reported it.</summary>
    private static readonly Type[] Unchecked =
    [
        typeof(NullReferenceException), typeof(IndexOutOfRangeException), typeof(InvalidCastException), typeof(DivideByZeroException),
        typeof(AccessViolationException), typeof(StackOverflowException), typeof(InsufficientExecutionStackException),
    ];

    public static Outcome Run(BadInput input, string root, TimeSpan timeout)
    {
        var folder = Path.Combine(root, Guid.NewGuid().ToString("N")[..12]);
        Directory.CreateDirectory(folder);
        var named = input.Write(folder);
        var before = Hashes(folder);
        Exception? error = null;
        var task = Task.Run(() =>
        {
            try { input.Read(folder); }
            catch (Exception e) { error = e; }
        });
        if (!task.Wait(timeout)) return new Outcome(input, Verdict.Hang, $"no answer within {timeout.TotalSeconds:0} s");
        if (!Hashes(folder).SequenceEqual(before)) return new Outcome(input, Verdict.Modified, "the input files changed");
        if (error is null)
            return input.MayLoad ? new Outcome(input, Verdict.Loaded, "") : new Outcome(input, Verdict.Unclear, "loaded without an error");
        var message = Flatten(error);
        if (Unchecked.Any(t => t.IsInstanceOfType(error)))
            return new Outcome(input, Verdict.Unclear, $"{error.GetType().Name}: {message}");
        // The message must say which file (or folder) is at fault: its name or its full path.
        var names = new[] { named, Path.GetFileName(named), folder, input.Field is { } f ? $"'{f}'" : null }.Where(n => !string.IsNullOrEmpty(n));
        return names.Any(n => message.Contains(n!, StringComparison.Ordinal))
            ? new Outcome(input, Verdict.Handled, $"{error.GetType().Name}: {message}")
            : new Outcome(input, Verdict.Unclear, $"{error.GetType().Name} without the file{(input.Field is null ? "" : " or field")}: {message}");
    }

    /// <summary>The message and those of inner exceptions: a wrapper may name the file while its cause names the field.</summary>
    private static string Flatten(Exception e)
    {
        var parts = new List<string>();
        for (var x = e; x != null; x = x.InnerException) parts.Add(x.Message);
        var text = string.Join(" | ", parts);
        return text.Length > 600 ? text[..600] + "..." : text;
    }

    private static List<string> Hashes(string folder) =>
        Directory.EnumerateFileSystemEntries(folder, "*", SearchOption.AllDirectories).Order(StringComparer.Ordinal)
            .Select(p => File.Exists(p) ? $"{p}:{Convert.ToHexString(SHA256.HashData(File.ReadAllBytes(p)))}" : $"{p}/").ToList();
}
