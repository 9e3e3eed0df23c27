using System.Runtime.InteropServices;

namespace LoRAHub.TorchExtensions.Tests;

/// <summary>TorchSharp loads (on Debian 12 too: the build weakens LibTorchSharp's GLIBCXX_3.4.32 need), on exactly one libtorch.</summary>
public class RuntimeTests
{
    [Fact]
    public void TorchSharp_runs_on_libtorch_2_10_or_newer()
    {
        var info = TorchRuntime.Describe();
        Assert.True(Version.TryParse(info.LibTorchVersion.Split('+', '-')[0], out var version), info.ToString());
        Assert.True(version >= new Version(2, 10), info.ToString());
        Assert.Equal(6f, ones(2, 3).sum().item<float>());
        Assert.Contains("libtorch:", info.ToString());
        Assert.Equal(torch.cuda.is_available(), info.CudaRuntimeVersion is not null);
        Assert.Equal(torch.cuda.is_available() ? torch.cuda.device_count() : 0, info.Devices.Count);
    }

    [Fact]
    public void OpenMp_threads_wait_passively_in_the_native_environment_libgomp_reads()
    {
        var info = TorchRuntime.Describe();
        if (!OperatingSystem.IsLinux()) return;
        // PASSIVE unless the runner chose a policy; either way libgomp (getenv) and .NET see the same value.
        Assert.NotNull(OpenMpWaitPolicy.Current);
        Assert.Equal(Environment.GetEnvironmentVariable(OpenMpWaitPolicy.Variable), OpenMpWaitPolicy.Current);
        Assert.Equal($"{info.Threads} (OMP_WAIT_POLICY={OpenMpWaitPolicy.Current})", info.ThreadsText);
    }

    [Fact]
    public void Exactly_one_libtorch_is_loaded_and_it_is_the_chosen_one()
    {
        TorchRuntime.Initialize();
        using (var t = ones(3)) t.sum().Dispose();
        if (torch.cuda.is_available()) using (var c = ones(3, device: CUDA)) c.sum().Dispose();
        var copies = LoadedLibraries.Find("libtorch_cpu.so");
        Assert.Single(copies);
        Assert.Single(LoadedLibraries.Find("libc10.so"));
        Assert.True(LoadedLibraries.Find("libtorch_cuda.so").Count <= 1);
        var chosen = Environment.GetEnvironmentVariable(TorchRuntime.LibTorchVariable);
        if (!string.IsNullOrWhiteSpace(chosen))
        {
            Assert.Equal(TorchRuntime.LibTorchFolder, Path.GetDirectoryName(copies[0]));
            Assert.StartsWith(Path.GetFullPath(chosen), copies[0]);
            // LibTorchSharp is the app's patched copy, not one from the chosen folder.
            Assert.StartsWith(Path.GetDirectoryName(typeof(torch).Assembly.Location)!, LoadedLibraries.Find("libLibTorchSharp").Single());
        }
    }

    [Fact]
    public void Initialize_is_idempotent_and_thread_safe()
    {
        Parallel.For(0, 8, _ => TorchRuntime.Initialize());
        TorchRuntime.Initialize();
        Assert.Single(LoadedLibraries.Find("libtorch_cpu.so"));
    }

    [Fact]
    public void A_wrong_libtorch_folder_is_named_in_the_error()
    {
        var e = Assert.Throws<InvalidOperationException>(() => TorchRuntime.FindLibFolder("/nonexistent/torch"));
        Assert.Contains("/nonexistent/torch", e.Message);
        Assert.Contains(TorchRuntime.LibTorchVariable, e.Message);
    }

    [Fact]
    public void Data_ptr_is_the_first_element_including_view_offsets()
    {
        using var scope = NewDisposeScope();
        var t = arange(10, ScalarType.Float32);
        var p = torchx.data_ptr(t);
        Assert.NotEqual(IntPtr.Zero, p);
        Assert.Equal(p + 3 * sizeof(float), torchx.data_ptr(t[3..]));
        Assert.Equal(7f, Marshal.PtrToStructure<float>(torchx.data_ptr(t[7..])));
    }

    [Fact]
    public void Cuda_statistics_are_zero_without_cuda()
    {
        if (torch.cuda.is_available()) return; // the CUDA run checks real figures (MemoryTests)
        Assert.Equal(0, torchx.cuda.memory_allocated());
        Assert.Equal(0, torchx.cuda.max_memory_reserved());
        torchx.cuda.reset_peak_memory_stats();
        torchx.cuda.empty_cache();
        Assert.Throws<InvalidOperationException>(() => torchx.cuda.get_device_properties());
    }
}
