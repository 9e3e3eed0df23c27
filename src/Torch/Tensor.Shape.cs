namespace LoRAHub.Torch;

// Views, reshaping and indexing.
public sealed unsafe partial class Tensor
{
    public Tensor view(params long[] shape)
    {
        fixed (long* p = shape) return new(Native.lh_view(Handle, p, shape.Length));
    }

    public Tensor reshape(params long[] shape)
    {
        fixed (long* p = shape) return new(Native.lh_reshape(Handle, p, shape.Length));
    }

    public Tensor expand(params long[] shape)
    {
        fixed (long* p = shape) return new(Native.lh_expand(Handle, p, shape.Length));
    }

    public Tensor expand_as(Tensor other) => expand(other.shape);

    public Tensor repeat(params long[] repeats)
    {
        fixed (long* p = repeats) return new(Native.lh_repeat(Handle, p, repeats.Length));
    }

    public Tensor permute(params long[] dims)
    {
        fixed (long* p = dims) return new(Native.lh_permute(Handle, p, dims.Length));
    }

    public Tensor view_as(Tensor other) => view(other.shape);
    public Tensor transpose(long dim0, long dim1) => new(Native.lh_transpose(Handle, dim0, dim1));
    public Tensor unsqueeze(long dim) => new(Native.lh_unsqueeze(Handle, dim));
    public Tensor squeeze() => new(Native.lh_squeeze(Handle, 0, 0));
    public Tensor squeeze(long dim) => new(Native.lh_squeeze(Handle, dim, 1));
    public Tensor flatten(long start_dim = 0, long end_dim = -1) => new(Native.lh_flatten(Handle, start_dim, end_dim));
    public Tensor narrow(long dim, long start, long length) => new(Native.lh_narrow(Handle, dim, start, length));
    public Tensor select(long dim, long index) => new(Native.lh_select(Handle, dim, index));

    public Tensor slice(long dim, long start, long end, long step = 1) => new(Native.lh_slice(Handle, dim, start, end, step));

    public Tensor index_select(long dim, Tensor index) => new(Native.lh_index_select(Handle, dim, index.Handle));
    public Tensor gather(long dim, Tensor index) => new(Native.lh_gather(Handle, dim, index.Handle));
    public Tensor scatter(long dim, Tensor index, Tensor src) => new(Native.lh_scatter(Handle, dim, index.Handle, src.Handle));
    public Tensor index_add(long dim, Tensor index, Tensor source) => new(Native.lh_index_add(Handle, dim, index.Handle, source.Handle));

    /// <summary>Advanced indexing with one tensor along the first dimension (t[idx]; a bool mask selects).</summary>
    public Tensor index(Tensor indices) => new(Native.lh_index(Handle, indices.Handle));

    public Tensor index_put_(Tensor indices, Tensor values)
    {
        Native.Check(Native.lh_index_put_(Handle, indices.Handle, values.Handle));
        return this;
    }

    public Tensor tril(long diagonal = 0) => new(Native.lh_tril(Handle, diagonal));
    public Tensor triu(long diagonal = 0) => new(Native.lh_triu(Handle, diagonal));
    public Tensor repeat_interleave(long repeats, long dim) => new(Native.lh_repeat_interleave(Handle, repeats, dim));
    public Tensor roll(long shifts, long dims) => new(Native.lh_roll(Handle, shifts, dims));
    public Tensor diag(long diagonal = 0) => new(Native.lh_diag(Handle, diagonal));
    public Tensor nonzero() => new(Native.lh_nonzero(Handle));

    public Tensor[] chunk(long chunks, long dim = 0)
    {
        if (chunks <= 0) throw new ArgumentOutOfRangeException(nameof(chunks), "chunks must be positive");
        var handles = new IntPtr[chunks];
        int n;
        fixed (IntPtr* p = handles) n = Native.lh_chunk(Handle, chunks, dim, p, handles.Length);
        return Wrap(handles, n);
    }

    public Tensor[] split(long[] sizes, long dim = 0)
    {
        var handles = new IntPtr[sizes.Length];
        int n;
        fixed (long* s = sizes)
        fixed (IntPtr* p = handles) n = Native.lh_split(Handle, s, sizes.Length, dim, p, handles.Length);
        return Wrap(handles, n);
    }

    /// <summary>Splits into pieces of split_size along dim (the last may be smaller).</summary>
    public Tensor[] split(long split_size, long dim = 0)
    {
        var total = size((int)dim);
        var sizes = new List<long>();
        for (long at = 0; at < total; at += split_size) sizes.Add(Math.Min(split_size, total - at));
        return split(sizes.ToArray(), dim);
    }

    public Tensor[] unbind(long dim = 0)
    {
        var handles = new IntPtr[size((int)dim)];
        int n;
        fixed (IntPtr* p = handles) n = Native.lh_unbind(Handle, dim, p, handles.Length);
        return Wrap(handles, n);
    }

    private static Tensor[] Wrap(IntPtr[] handles, int count)
    {
        if (count < 0) Native.ThrowLastError();
        var result = new Tensor[count];
        for (var i = 0; i < count; i++) result[i] = new Tensor(handles[i]);
        return result;
    }

    /// <summary>
    /// Python-style indexing: t[0], t[.., 1..3], t[TensorIndex.Ellipsis, 0], t[TensorIndex.None], t[TensorIndex.Slice(0, 8, 2)], t[maskOrIndexTensor].
    /// </summary>
    public Tensor this[params TensorIndex[] indices]
    {
        get => TensorIndex.Apply(this, indices);
    }
}
