using System.Reflection;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace LoRAHub.Torch;

/// <summary>P/Invoke declarations for native/src (the extern "C" shim over libtorch).</summary>
internal static unsafe partial class Native
{
    private const string Lib = "lorahub_native";

    // Runs before the first native call: tells the runtime where to find the shim.
    static Native() =>
        NativeLibrary.SetDllImportResolver(typeof(Native).Assembly, (name, assembly, path) =>
            name == Lib ? NativeLibraryLocator.Load(assembly) : IntPtr.Zero);

    // errors and library
    [LibraryImport(Lib), SuppressGCTransition] internal static partial int lh_last_error_kind();
    [LibraryImport(Lib), SuppressGCTransition] internal static partial IntPtr lh_last_error_message();
    [LibraryImport(Lib), SuppressGCTransition] internal static partial void lh_clear_error();
    [LibraryImport(Lib), SuppressGCTransition] internal static partial long lh_live_tensors();
    [LibraryImport(Lib)] internal static partial IntPtr lh_torch_version();
    [LibraryImport(Lib)] internal static partial int lh_has_cuda_build();
    [LibraryImport(Lib)] internal static partial void lh_set_num_threads(int n);
    [LibraryImport(Lib)] internal static partial int lh_get_num_threads();

    // handles and metadata
    [LibraryImport(Lib)] internal static partial void lh_tensor_free(IntPtr t);
    [LibraryImport(Lib), SuppressGCTransition] internal static partial int lh_tensor_dim(IntPtr t);
    [LibraryImport(Lib), SuppressGCTransition] internal static partial void lh_tensor_sizes(IntPtr t, long* output);
    [LibraryImport(Lib), SuppressGCTransition] internal static partial void lh_tensor_strides(IntPtr t, long* output);
    [LibraryImport(Lib), SuppressGCTransition] internal static partial long lh_tensor_numel(IntPtr t);
    [LibraryImport(Lib), SuppressGCTransition] internal static partial int lh_tensor_dtype(IntPtr t);
    [LibraryImport(Lib), SuppressGCTransition] internal static partial int lh_tensor_device_type(IntPtr t);
    [LibraryImport(Lib), SuppressGCTransition] internal static partial int lh_tensor_device_index(IntPtr t);
    [LibraryImport(Lib), SuppressGCTransition] internal static partial int lh_tensor_is_contiguous(IntPtr t);
    [LibraryImport(Lib), SuppressGCTransition] internal static partial long lh_tensor_element_size(IntPtr t);
    [LibraryImport(Lib), SuppressGCTransition] internal static partial long lh_tensor_storage_id(IntPtr t);
    [LibraryImport(Lib)] internal static partial IntPtr lh_tensor_to_string(IntPtr t);
    [LibraryImport(Lib)] internal static partial void lh_free_string(IntPtr s);

    // creation
    [LibraryImport(Lib)] internal static partial IntPtr lh_create(int kind, long* shape, int ndim, int dtype, int dev, int devIdx, int requiresGrad);
    [LibraryImport(Lib)] internal static partial IntPtr lh_full(long* shape, int ndim, double value, int dtype, int dev, int devIdx, int requiresGrad);
    [LibraryImport(Lib)] internal static partial IntPtr lh_randint(long low, long high, long* shape, int ndim, int dtype, int dev, int devIdx);
    [LibraryImport(Lib)] internal static partial IntPtr lh_arange(double start, double end, double step, int dtype, int dev, int devIdx);
    [LibraryImport(Lib)] internal static partial IntPtr lh_linspace(double start, double end, long steps, int dtype, int dev, int devIdx);
    [LibraryImport(Lib)] internal static partial IntPtr lh_eye(long n, long m, int dtype, int dev, int devIdx);
    [LibraryImport(Lib)] internal static partial IntPtr lh_like(int kind, IntPtr t);
    [LibraryImport(Lib)] internal static partial IntPtr lh_full_like(IntPtr t, double value);
    [LibraryImport(Lib)] internal static partial IntPtr lh_scalar_tensor(double value, int dtype, int dev, int devIdx);
    [LibraryImport(Lib)] internal static partial IntPtr lh_from_buffer(void* data, long nbytes, long* shape, int ndim, int dtype, int dev, int devIdx);
    [LibraryImport(Lib)] internal static partial int lh_copy_to_buffer(IntPtr t, void* dst, long nbytes);
    [LibraryImport(Lib)] internal static partial int lh_item_double(IntPtr t, double* output);
    [LibraryImport(Lib)] internal static partial int lh_item_long(IntPtr t, long* output);
    [LibraryImport(Lib)] internal static partial int lh_manual_seed(ulong seed);
    [LibraryImport(Lib)] internal static partial IntPtr lh_cpu_rng_get_state();
    [LibraryImport(Lib)] internal static partial int lh_cpu_rng_set_state(IntPtr state);

    // elementwise
    [LibraryImport(Lib)] internal static partial IntPtr lh_unary(int op, IntPtr a);
    [LibraryImport(Lib)] internal static partial int lh_unary_(int op, IntPtr a);
    [LibraryImport(Lib)] internal static partial IntPtr lh_binary(int op, IntPtr a, IntPtr b, double alpha);
    [LibraryImport(Lib)] internal static partial IntPtr lh_binary_scalar(int op, IntPtr a, double value, int isIntegral);
    [LibraryImport(Lib)] internal static partial int lh_binary_(int op, IntPtr a, IntPtr b, double alpha);
    [LibraryImport(Lib)] internal static partial int lh_binary_scalar_(int op, IntPtr a, double value, int isIntegral);
    [LibraryImport(Lib)] internal static partial int lh_copy_(IntPtr dst, IntPtr src);
    [LibraryImport(Lib)] internal static partial int lh_fill_(IntPtr dst, double value);
    [LibraryImport(Lib)] internal static partial int lh_zero_(IntPtr dst);
    [LibraryImport(Lib)] internal static partial int lh_uniform_(IntPtr dst, double from, double to);
    [LibraryImport(Lib)] internal static partial int lh_normal_(IntPtr dst, double mean, double std);
    [LibraryImport(Lib)] internal static partial int lh_masked_fill_(IntPtr dst, IntPtr mask, double value);
    [LibraryImport(Lib)] internal static partial int lh_addmm_(IntPtr dst, IntPtr a, IntPtr b, double beta, double alpha);
    [LibraryImport(Lib)] internal static partial IntPtr lh_addcmul(IntPtr self, IntPtr a, IntPtr b, double value);
    [LibraryImport(Lib)] internal static partial IntPtr lh_addmm(IntPtr self, IntPtr a, IntPtr b, double beta, double alpha);
    [LibraryImport(Lib)] internal static partial IntPtr lh_lerp(IntPtr a, IntPtr b, double weight);
    [LibraryImport(Lib)] internal static partial IntPtr lh_where(IntPtr cond, IntPtr a, IntPtr b);
    [LibraryImport(Lib)] internal static partial IntPtr lh_clamp(IntPtr a, double min, double max, int hasMin, int hasMax);
    [LibraryImport(Lib)] internal static partial IntPtr lh_masked_fill(IntPtr a, IntPtr mask, double value);
    [LibraryImport(Lib)] internal static partial IntPtr lh_to(IntPtr a, int dtype, int dev, int devIdx, int nonBlocking, int copy);
    [LibraryImport(Lib)] internal static partial IntPtr lh_alias(IntPtr a);
    [LibraryImport(Lib)] internal static partial int lh_allclose(IntPtr a, IntPtr b, double rtol, double atol, int* output);
    [LibraryImport(Lib)] internal static partial int lh_equal(IntPtr a, IntPtr b, int* output);

    // reductions
    [LibraryImport(Lib)] internal static partial IntPtr lh_reduce(int op, IntPtr a, long* dims, int ndims, int keepdim, int hasDims);
    [LibraryImport(Lib)] internal static partial IntPtr lh_sum_dtype(IntPtr a, int dtype);
    [LibraryImport(Lib)] internal static partial IntPtr lh_argext(int kind, IntPtr a, long dim, int keepdim, int hasDim);
    [LibraryImport(Lib)] internal static partial int lh_max_dim(int kind, IntPtr a, long dim, int flag, IntPtr* values, IntPtr* indices);
    [LibraryImport(Lib)] internal static partial int lh_topk(IntPtr a, long k, long dim, int largest, IntPtr* values, IntPtr* indices);
    [LibraryImport(Lib)] internal static partial IntPtr lh_cumsum(IntPtr a, long dim);
    [LibraryImport(Lib)] internal static partial IntPtr lh_multinomial(IntPtr probs, long n, int replacement);

    // shape and indexing
    [LibraryImport(Lib)] internal static partial IntPtr lh_view(IntPtr a, long* shape, int n);
    [LibraryImport(Lib)] internal static partial IntPtr lh_reshape(IntPtr a, long* shape, int n);
    [LibraryImport(Lib)] internal static partial IntPtr lh_expand(IntPtr a, long* shape, int n);
    [LibraryImport(Lib)] internal static partial IntPtr lh_repeat(IntPtr a, long* reps, int n);
    [LibraryImport(Lib)] internal static partial IntPtr lh_permute(IntPtr a, long* order, int n);
    [LibraryImport(Lib)] internal static partial IntPtr lh_transpose(IntPtr a, long d0, long d1);
    [LibraryImport(Lib)] internal static partial IntPtr lh_unsqueeze(IntPtr a, long dim);
    [LibraryImport(Lib)] internal static partial IntPtr lh_squeeze(IntPtr a, long dim, int hasDim);
    [LibraryImport(Lib)] internal static partial IntPtr lh_flatten(IntPtr a, long start, long end);
    [LibraryImport(Lib)] internal static partial IntPtr lh_narrow(IntPtr a, long dim, long start, long length);
    [LibraryImport(Lib)] internal static partial IntPtr lh_select(IntPtr a, long dim, long index);
    [LibraryImport(Lib)] internal static partial IntPtr lh_slice(IntPtr a, long dim, long start, long end, long step);
    [LibraryImport(Lib)] internal static partial IntPtr lh_index_select(IntPtr a, long dim, IntPtr index);
    [LibraryImport(Lib)] internal static partial IntPtr lh_index(IntPtr a, IntPtr index);
    [LibraryImport(Lib)] internal static partial IntPtr lh_gather(IntPtr a, long dim, IntPtr index);
    [LibraryImport(Lib)] internal static partial IntPtr lh_scatter(IntPtr a, long dim, IntPtr index, IntPtr src);
    [LibraryImport(Lib)] internal static partial IntPtr lh_index_add(IntPtr a, long dim, IntPtr index, IntPtr src);
    [LibraryImport(Lib)] internal static partial int lh_index_put_(IntPtr a, IntPtr index, IntPtr values);
    [LibraryImport(Lib)] internal static partial IntPtr lh_tril(IntPtr a, long diagonal);
    [LibraryImport(Lib)] internal static partial IntPtr lh_triu(IntPtr a, long diagonal);
    [LibraryImport(Lib)] internal static partial IntPtr lh_repeat_interleave(IntPtr a, long repeats, long dim);
    [LibraryImport(Lib)] internal static partial IntPtr lh_roll(IntPtr a, long shift, long dim);
    [LibraryImport(Lib)] internal static partial IntPtr lh_diag(IntPtr a, long diagonal);
    [LibraryImport(Lib)] internal static partial IntPtr lh_outer(IntPtr a, IntPtr b);
    [LibraryImport(Lib)] internal static partial IntPtr lh_one_hot(IntPtr a, long numClasses);
    [LibraryImport(Lib)] internal static partial IntPtr lh_nonzero(IntPtr a);
    [LibraryImport(Lib)] internal static partial IntPtr lh_cat(IntPtr* list, int n, long dim);
    [LibraryImport(Lib)] internal static partial IntPtr lh_stack(IntPtr* list, int n, long dim);
    [LibraryImport(Lib)] internal static partial int lh_chunk(IntPtr a, long chunks, long dim, IntPtr* output, int capacity);
    [LibraryImport(Lib)] internal static partial int lh_split(IntPtr a, long* sizes, int n, long dim, IntPtr* output, int capacity);
    [LibraryImport(Lib)] internal static partial int lh_unbind(IntPtr a, long dim, IntPtr* output, int capacity);
    [LibraryImport(Lib)] internal static partial int lh_svd(IntPtr a, int fullMatrices, IntPtr* u, IntPtr* s, IntPtr* vh);
    [LibraryImport(Lib)] internal static partial int lh_qr(IntPtr a, IntPtr* q, IntPtr* r);
    [LibraryImport(Lib)] internal static partial IntPtr lh_vector_norm(IntPtr a, double ord, long* dims, int ndims, int keepdim, int hasDims);

    // nn
    [LibraryImport(Lib)] internal static partial IntPtr lh_linear(IntPtr x, IntPtr w, IntPtr b);
    [LibraryImport(Lib)] internal static partial IntPtr lh_embedding(IntPtr weight, IntPtr indices, long paddingIdx);
    [LibraryImport(Lib)] internal static partial IntPtr lh_layer_norm(IntPtr x, long* shape, int n, IntPtr w, IntPtr b, double eps);
    [LibraryImport(Lib)] internal static partial IntPtr lh_rms_norm(IntPtr x, IntPtr w, double eps);
    [LibraryImport(Lib)] internal static partial IntPtr lh_softmax(IntPtr x, long dim, int dtype);
    [LibraryImport(Lib)] internal static partial IntPtr lh_log_softmax(IntPtr x, long dim, int dtype);
    [LibraryImport(Lib)] internal static partial IntPtr lh_cross_entropy(IntPtr logits, IntPtr target, long ignoreIndex, int reduction, double labelSmoothing);
    [LibraryImport(Lib)] internal static partial IntPtr lh_nll_loss(IntPtr logp, IntPtr target, long ignoreIndex, int reduction);
    [LibraryImport(Lib)] internal static partial IntPtr lh_mse_loss(IntPtr a, IntPtr b, int reduction);
    [LibraryImport(Lib)] internal static partial IntPtr lh_dropout(IntPtr x, double p, int train);
    [LibraryImport(Lib)] internal static partial IntPtr lh_sdpa(IntPtr q, IntPtr k, IntPtr v, IntPtr mask, double dropoutP, int isCausal, double scale, int hasScale);

    [LibraryImport(Lib)] internal static partial IntPtr lh_chunked_cross_entropy(IntPtr hidden, IntPtr weight, IntPtr labels, long chunk, long ignoreIndex);

    [LibraryImport(Lib)] internal static partial IntPtr lh_checkpoint(IntPtr x, IntPtr fn, long id);

    [LibraryImport(Lib)] internal static partial int lh_quantize_blockwise(IntPtr x, IntPtr code, long blocksize, int bits, IntPtr* q, IntPtr* absmax);
    [LibraryImport(Lib)] internal static partial IntPtr lh_dequantize_blockwise(IntPtr q, IntPtr absmax, IntPtr code, long blocksize, int bits, long numel, int dtype);

    // autograd
    [LibraryImport(Lib), SuppressGCTransition] internal static partial int lh_requires_grad(IntPtr t);
    [LibraryImport(Lib)] internal static partial int lh_set_requires_grad(IntPtr t, int value);
    [LibraryImport(Lib), SuppressGCTransition] internal static partial int lh_is_leaf(IntPtr t);
    [LibraryImport(Lib)] internal static partial int lh_retain_grad(IntPtr t);
    [LibraryImport(Lib)] internal static partial int lh_grad(IntPtr t, IntPtr* output);
    [LibraryImport(Lib)] internal static partial int lh_set_grad(IntPtr t, IntPtr grad);
    [LibraryImport(Lib)] internal static partial int lh_backward(IntPtr t, IntPtr grad, int retainGraph);
    [LibraryImport(Lib)] internal static partial int lh_set_data(IntPtr t, IntPtr src);
    [LibraryImport(Lib), SuppressGCTransition] internal static partial int lh_grad_enabled();
    [LibraryImport(Lib), SuppressGCTransition] internal static partial void lh_set_grad_enabled(int enabled);

    // optimizers
    [LibraryImport(Lib)] internal static partial int lh_adamw_step(IntPtr* parameters, IntPtr* expAvgs, IntPtr* expAvgSqs, IntPtr* steps, int n,
        double lr, double beta1, double beta2, double eps, double weightDecay, int useFused);
    [LibraryImport(Lib)] internal static partial int lh_sgd_step(IntPtr* parameters, IntPtr* momentumBufs, int n, double lr, double momentum, double weightDecay);
    [LibraryImport(Lib)] internal static partial int lh_clip_grad_norm(IntPtr* parameters, int n, double maxNorm, double* totalNorm);

    // cuda
    [LibraryImport(Lib)] internal static partial int lh_cuda_is_available();
    [LibraryImport(Lib)] internal static partial int lh_cuda_device_count();
    [LibraryImport(Lib)] internal static partial int lh_cuda_synchronize(int device);
    [LibraryImport(Lib)] internal static partial int lh_cuda_memory_stat(int device, int which, long* output);
    [LibraryImport(Lib)] internal static partial int lh_cuda_reset_peak_memory_stats(int device);
    [LibraryImport(Lib)] internal static partial int lh_cuda_empty_cache();
    [LibraryImport(Lib)] internal static partial int lh_cuda_device_info(int device, byte* name, int capacity, long* total, long* freeBytes);
    [LibraryImport(Lib)] internal static partial IntPtr lh_cuda_rng_get_state(int device);
    [LibraryImport(Lib)] internal static partial int lh_cuda_rng_set_state(int device, IntPtr state);

    /// <summary>Throws the pending native error when a call returned a null handle.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static IntPtr Check(IntPtr handle)
    {
        if (handle == IntPtr.Zero) ThrowLastError();
        return handle;
    }

    /// <summary>Throws the pending native error when a call returned a non-zero status.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static void Check(int status)
    {
        if (status != 0) ThrowLastError();
    }

    [MethodImpl(MethodImplOptions.NoInlining)]
    internal static void ThrowLastError()
    {
        var kind = (TorchErrorKind)lh_last_error_kind();
        var message = Marshal.PtrToStringUTF8(lh_last_error_message()) ?? "unknown native error";
        lh_clear_error();
        throw TorchException.Create(kind, message);
    }
}

/// <summary>Finds liblorahub_native.so: $LORAHUB_NATIVE, next to the assembly, or native/build above it.</summary>
internal static class NativeLibraryLocator
{
    internal const string FileName = "liblorahub_native.so";

    internal static IntPtr Load(Assembly assembly)
    {
        var tried = new List<string>();
        foreach (var candidate in Candidates(assembly))
        {
            tried.Add(candidate);
            if (File.Exists(candidate)) return NativeLibrary.Load(candidate);
        }
        throw new DllNotFoundException(
            $"LoRAHub's native library ({FileName}) was not found. Looked in: {string.Join(", ", tried)}. " +
            "Build it with `native/build.sh` (or run ./setup.sh), or point LORAHUB_NATIVE at the file.");
    }

    private static IEnumerable<string> Candidates(Assembly assembly)
    {
        var env = Environment.GetEnvironmentVariable("LORAHUB_NATIVE");
        if (!string.IsNullOrEmpty(env)) yield return Directory.Exists(env) ? Path.Combine(env, FileName) : env;
        var dir = Path.GetDirectoryName(assembly.Location);
        if (string.IsNullOrEmpty(dir)) dir = AppContext.BaseDirectory;
        yield return Path.Combine(dir, FileName);
        for (var d = new DirectoryInfo(dir); d != null; d = d.Parent)
            yield return Path.Combine(d.FullName, "native", "build", FileName);
    }
}
