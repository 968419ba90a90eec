"""The paper's prompts, verbatim where the paper gives them."""

# Paper 3.1: system prompt for structured long-text generation.
STRUCTURED_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. User presents a request for a formal document, "
    "and the Assistant generates a comprehensive and well-structured long-text based on the request. "
    "The assistant first conceives a summary and outline, and then produces the complete document. "
    "The summary, outline and document are enclosed within <summary></summary>, <outline></outline> "
    "and <answer></answer> tags, respectively, i.e., <summary>summary here</summary>"
    "<outline>outline here</outline><answer>document here</answer>"
)

# Paper 3.2: query generation (the paper's English rendering of its Chinese prompt).
QUERY_GENERATION_PROMPT_EN = (
    "I want to generate question-answer pairs for the long-text generation task of my Large Language "
    "Model. Please generate new long-text generation requests that users may ask around the topics "
    "covered by the following examples. The output format should be similar to the examples.\n"
    "query #1: {q0}\nquery #2: {q1}\nquery #3: {q2}\nquery #4: {q3}\nquery #5: {q4}\n"
    "Please organize the output in Python list format and use queries.extend(generated_query) "
    "to update the output."
)

# The same prompt in Chinese, the language the paper used.
QUERY_GENERATION_PROMPT_ZH = (
    "我想为我的大语言模型的长文本生成任务构造问答对。请围绕以下示例所涉及的主题，"
    "生成用户可能提出的新的长文本生成请求，输出格式与示例保持一致。\n"
    "query #1: {q0}\nquery #2: {q1}\nquery #3: {q2}\nquery #4: {q3}\nquery #5: {q4}\n"
    "请以 Python 列表格式组织输出，并使用 queries.extend(generated_query) 更新输出。"
)

QUERY_GENERATION_PROMPTS = {"en": QUERY_GENERATION_PROMPT_EN, "zh": QUERY_GENERATION_PROMPT_ZH}


def query_generation_prompt(examples: list[str], lang: str = "en") -> str:
    """Fills the 3.2 prompt with exactly five example queries."""
    if len(examples) != 5:
        raise ValueError(f"query generation needs 5 examples, got {len(examples)}")
    template = QUERY_GENERATION_PROMPTS[lang]
    return template.format(**{f"q{i}": q for i, q in enumerate(examples)})


# Appendix E: LLM-as-a-judge prompt (GPT-4o in the paper).
JUDGE_PROMPT = (
    "You are an expert evaluator of written responses on the topic of Chinese state-owned assets and "
    "enterprises (SOEs). Your role is to critically assess a candidate's response to a writing prompt, "
    "focusing on how effectively it addresses the original task. Your evaluation should be rigorous—not "
    "lenient—and should highlight meaningful distinctions in quality. Assess the response according to "
    "the following criteria, assigning each a score from 1 to 10 (1 = extremely poor, 5 = average, "
    "10 = outstanding):\n"
    "Evaluation Criteria:\n"
    "1. Content Accuracy and Relevance: Does the response demonstrate a sound and accurate understanding "
    "of the issues raised, particularly Chinese government policies, official statements, and reform "
    "priorities concerning SOEs and state-owned assets?\n"
    "2. Tone and Formality: Is the tone appropriate for an official or institutional context? Does it "
    "maintain a consistent level of formality throughout?\n"
    "3. Idea Development and Argumentation: Are viewpoints clearly articulated and well-supported with "
    "logical reasoning, evidence, or policy references? Are the ideas developed thoroughly and insightfully?\n"
    "4. Structure and Clarity: Is the writing logically organized, easy to follow, and coherent? Is the "
    "expression varied yet precise?\n"
    "5. Persuasiveness and Effectiveness: Does the response communicate its points compellingly and "
    "persuasively, while maintaining clarity and professionalism?\n"
    "<User Request>{instruction}</User Request>\n"
    "<Response>{response}</Response>\n"
    "Instructions: First, provide a concise overall analysis of the response, noting major strengths "
    "and weaknesses. Then, deliver a detailed evaluation in strict JSON format as follows: "
    '{{"Analysis": "Your analysis here.", "Content Accuracy and Relevance": score, '
    '"Tone and Formality": score, "Idea Development and Argumentation": score, '
    '"Structure and Clarity": score, "Persuasiveness and Effectiveness": score}}'
)

# JSON keys the judge prompt asks for -> field names of shared.schemas.JudgeCriteria.
JUDGE_CRITERIA_KEYS = {
    "Content Accuracy and Relevance": "content_accuracy_relevance",
    "Tone and Formality": "tone_formality",
    "Idea Development and Argumentation": "idea_development_argumentation",
    "Structure and Clarity": "structure_clarity",
    "Persuasiveness and Effectiveness": "persuasiveness_effectiveness",
}


def judge_prompt(instruction: str, response: str) -> str:
    return JUDGE_PROMPT.format(instruction=instruction, response=response)


def chat_messages(query: str) -> list[dict[str, str]]:
    """OpenAI chat messages for one document request under the 3.1 system prompt."""
    return [{"role": "system", "content": STRUCTURED_SYSTEM_PROMPT}, {"role": "user", "content": query}]
