using System.Collections.Concurrent;
using System.Runtime.InteropServices;

namespace LoRAHub.Torch;

public static unsafe partial class torch
{
    public static class utils
    {
        private static long nextId;
        private static readonly ConcurrentDictionary<long, Func<Tensor, Tensor>> Functions = new();
        private static readonly ConcurrentDictionary<long, Exception> Failures = new();

        /// <summary>
        /// Activation checkpointing (torch.utils.checkpoint): runs f(x) without keeping its activations and recomputes
        /// them during backward, trading compute for memory. f must be deterministic given the RNG state (it is
        /// restored for the recomputation) and must not dispose x.
        /// </summary>
        public static Tensor checkpoint(Func<Tensor, Tensor> f, Tensor x)
        {
            var id = Interlocked.Increment(ref nextId);
            Functions[id] = f;
            var handle = Native.lh_checkpoint(x.Handle, (IntPtr)(delegate* unmanaged<long, IntPtr, int, IntPtr>)&Invoke, id);
            if (handle != IntPtr.Zero) return new Tensor(handle);
            Functions.TryRemove(id, out _);
            if (Failures.TryRemove(id, out var inner))
            {
                Native.lh_clear_error();
                throw new TorchException(TorchErrorKind.Generic, $"checkpointed function failed: {inner.Message}", inner);
            }
            Native.ThrowLastError();
            throw new InvalidOperationException("unreachable");
        }

        // Called by the shim: once in forward, once more (release = 1) in backward.
        [UnmanagedCallersOnly]
        private static IntPtr Invoke(long id, IntPtr input, int release)
        {
            try
            {
                if (!Functions.TryGetValue(id, out var f)) throw new InvalidOperationException($"checkpointed function {id} is gone");
                using var scope = NewDisposeScope();
                var x = new Tensor(input);
                var y = f(x);
                if (release != 0) Functions.TryRemove(id, out _);
                return Native.Check(Native.lh_alias(y.Handle));
            }
            catch (Exception e)
            {
                Failures[id] = e;
                return IntPtr.Zero;
            }
        }
    }
}
