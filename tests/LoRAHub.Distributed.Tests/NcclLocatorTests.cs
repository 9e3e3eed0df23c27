using LoRAHub.Distributed.Nccl;

namespace LoRAHub.Distributed.Tests;

/// <summary>Where libnccl.so.2 is looked for: the variable first, then beside the libtorch in use (pip's nvidia/nccl/lib).</summary>
[Collection(RanksCollection.Name)] // reads process-wide environment variables that it sets
public sealed class NcclLocatorTests
{
    [Fact]
    public void The_variable_comes_first_then_pip_layout_next_to_torch_lib()
    {
        var site = Path.Combine(Path.GetTempPath(), "lorahub-site-" + Guid.NewGuid().ToString("N"));
        var torchLib = Path.Combine(site, "torch", "lib");
        Directory.CreateDirectory(torchLib);
        var saved = (Environment.GetEnvironmentVariable(NcclLocator.EnvironmentVariable), Environment.GetEnvironmentVariable("LORAHUB_LIBTORCH"));
        try
        {
            Environment.SetEnvironmentVariable(NcclLocator.EnvironmentVariable, "/opt/nccl/libnccl.so.2");
            Environment.SetEnvironmentVariable("LORAHUB_LIBTORCH", torchLib);
            var candidates = NcclLocator.Candidates().ToList();
            Assert.Equal("/opt/nccl/libnccl.so.2", candidates[0]);
            var pip = Path.Combine(site, "nvidia", "nccl", "lib", "libnccl.so.2");
            Assert.Contains(Path.Combine(torchLib, "libnccl.so.2"), candidates);
            Assert.Contains(pip, candidates);
            Assert.True(candidates.IndexOf(pip) < candidates.IndexOf("libnccl.so.2"), "the loader's search path comes last");
        }
        finally
        {
            Environment.SetEnvironmentVariable(NcclLocator.EnvironmentVariable, saved.Item1);
            Environment.SetEnvironmentVariable("LORAHUB_LIBTORCH", saved.Item2);
            Directory.Delete(site, recursive: true);
        }
    }
}
