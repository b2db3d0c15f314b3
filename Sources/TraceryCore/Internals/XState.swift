import CTraceryShims

/// The processor state `xsave` saves in this process (x87, SSE, and where enabled AVX's upper
/// halves, AVX-512's opmasks and registers): the components the kernel enabled and their save
/// area's size. Generated code that calls Swift or C code between a traced function's caller and
/// its body (the recorder's refill) keeps all of it; `size` 0: no `xsave` here.
struct XState {
  let components: UInt64
  let size: Int

  static let current: XState = {
    var components: UInt64 = 0
    var size: UInt32 = 0
    ctracery_xsave_layout(&components, &size)
    return XState(components: components, size: Int(size))
  }()
}
