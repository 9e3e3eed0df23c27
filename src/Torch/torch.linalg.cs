namespace LoRAHub.Torch;

public static unsafe partial class torch
{
    public static class linalg
    {
        public static (Tensor U, Tensor S, Tensor Vh) svd(Tensor a, bool full_matrices = true)
        {
            IntPtr u, s, vh;
            Native.Check(Native.lh_svd(a.Handle, full_matrices ? 1 : 0, &u, &s, &vh));
            return (new Tensor(u), new Tensor(s), new Tensor(vh));
        }

        public static (Tensor Q, Tensor R) qr(Tensor a)
        {
            IntPtr q, r;
            Native.Check(Native.lh_qr(a.Handle, &q, &r));
            return (new Tensor(q), new Tensor(r));
        }

        public static Tensor vector_norm(Tensor a, double ord = 2, long[]? dim = null, bool keepdim = false)
        {
            if (dim == null) return new(Native.lh_vector_norm(a.Handle, ord, null, 0, keepdim ? 1 : 0, 0));
            fixed (long* d = dim) return new(Native.lh_vector_norm(a.Handle, ord, d, dim.Length, keepdim ? 1 : 0, 1));
        }
    }
}
