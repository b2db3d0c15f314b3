/// What a traced function's trampoline must preserve and hand on: the kernel's
/// `btf_func_model`. The more precise the model, the less a trampoline saves.
public struct FunctionModel: Sendable, Hashable, CustomStringConvertible {
  /// Where the function's result lives.
  public enum Returns: Sendable, Hashable {
    case void
    /// rax.
    case integer
    /// rax:rdx (a 16-byte struct of integers).
    case integerPair
    /// xmm0.
    case double
    /// xmm0:xmm1.
    case doublePair
    /// rax, rdx, xmm0 and xmm1 are all preserved.
    case unknown
  }

  /// Integer arguments passed in registers (rdi, rsi, rdx, rcx, r8, r9): 0 to 6.
  public var integerArguments: Int
  /// Floating-point arguments passed in xmm0-7: 0 to 8.
  public var floatArguments: Int
  /// 8-byte words of arguments passed on the stack, or nil when unknown. Exit and
  /// modify-return handlers call the original, which needs them copied: they refuse nil.
  public var stackArgumentWords: Int?
  public var returns: Returns
  /// A varargs function: al carries the number of vector registers used, so rax is preserved.
  public var isVariadic: Bool

  public init(
    integerArguments: Int = 6, floatArguments: Int = 0, stackArgumentWords: Int? = 0, returns: Returns = .integer,
    isVariadic: Bool = false
  ) {
    precondition((0...6).contains(integerArguments), "at most 6 integer arguments travel in registers")
    precondition((0...8).contains(floatArguments), "at most 8 floating-point arguments travel in registers")
    precondition(stackArgumentWords.map { $0 >= 0 && $0 <= 64 } ?? true, "0 to 64 stack argument words")
    self.integerArguments = integerArguments
    self.floatArguments = floatArguments
    self.stackArgumentWords = stackArgumentWords
    self.returns = returns
    self.isVariadic = isVariadic
  }

  /// Nothing known: every argument register, rax and xmm0-7 preserved, every return register
  /// handed back; stack arguments unknown (so only entry handlers can attach).
  public static let unknown = FunctionModel(
    integerArguments: 6, floatArguments: 8, stackArgumentWords: nil, returns: .unknown, isVariadic: true)

  /// What of this model lives in general-purpose registers: all a trampoline must preserve
  /// around handlers that promise not to touch vector registers (xmm0-7 then pass through).
  var withoutVectorRegisters: FunctionModel {
    var model = self
    model.floatArguments = 0
    switch returns {
    case .double, .doublePair: model.returns = .void
    case .unknown: model.returns = .integerPair
    case .void, .integer, .integerPair: break
    }
    return model
  }

  var returnsIntegers: Bool { [.integer, .integerPair, .unknown].contains(returns) }
  var returnsPair: Bool { [.integerPair, .unknown].contains(returns) }
  var returnsFloats: Bool { [.double, .doublePair, .unknown].contains(returns) }
  var returnsFloatPair: Bool { [.doublePair, .unknown].contains(returns) }

  public var description: String {
    "\(integerArguments) int, \(floatArguments) float, "
      + "\(stackArgumentWords.map { "\($0) stack words" } ?? "unknown stack arguments"), returns \(returns)"
      + (isVariadic ? ", variadic" : "")
  }
}
