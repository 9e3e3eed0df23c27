namespace LoRAHub.Reliability.Tests.Corpus;

/// <summary>
/// One generated bad input: files written into a fresh folder, and the product call that reads them. The call must
/// either throw a managed exception whose message names the file (or the file and line, for data), or — only where
/// <see cref="MayLoad"/> says a mutation can be harmless (a flipped byte inside tensor data) — load normally.
/// </summary>
/// <param name="Kind">The file kind ("safetensors", "config.json", ...), for the report.</param>
/// <param name="Owner">Who owns the reader (H6 = us), for the cross-area list when a case is not handled.</param>
/// <param name="Write">Writes the case's files into the folder; returns the path the error must name.</param>
/// <param name="Read">Reads the folder as the product would (the argument is the folder).</param>
/// <param name="Field">The field at fault: a message naming it (rather than the file) also counts as clear.</param>
public sealed record BadInput(string Kind, string Name, string Owner, Func<string, string> Write, Action<string> Read, bool MayLoad = false, string? Field = null)
{
    public override string ToString() => $"{Kind}/{Name}";
}
