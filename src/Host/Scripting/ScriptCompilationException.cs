namespace LoRAHub.Host.Scripting;

/// <summary>The script did not compile; <see cref="Errors"/> are formatted as <c>path(line,col): error CSxxxx: message</c>.</summary>
public sealed class ScriptCompilationException(IReadOnlyList<string> errors)
    : Exception(string.Join(Environment.NewLine, errors))
{
    public IReadOnlyList<string> Errors { get; } = errors;
}
