using System.Reflection;
using LoRAHub.TorchExtensions.Cuda;

namespace LoRAHub.TorchExtensions.Tests;

/// <summary>The CUDA programs TorchExtensions builds: every static <see cref="CudaProgram"/> field of the assembly, by its declaring type and field name.</summary>
internal static class LibraryPrograms
{
    public static IReadOnlyList<(string Field, CudaProgram Program)> Static() =>
        typeof(CudaKernels).Assembly.GetTypes()
            .SelectMany(t => t.GetFields(BindingFlags.Static | BindingFlags.NonPublic | BindingFlags.Public))
            .Where(f => f.FieldType == typeof(CudaProgram))
            .Select(f => ($"{f.DeclaringType!.Name}.{f.Name}", (CudaProgram)f.GetValue(null)!))
            .ToList();
}
