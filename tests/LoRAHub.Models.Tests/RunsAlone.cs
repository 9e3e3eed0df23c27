namespace LoRAHub.Models.Tests;

/// <summary>
/// The xunit collection of tests that read or set process-wide state (the global random generator, counters of
/// launches or built tables, libtorch's attention switches): they run alone, never beside another test class.
/// </summary>
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class RunsAlone
{
    public const string Name = "runs alone (process-wide state)";
}
