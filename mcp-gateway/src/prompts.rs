//! Prompt templates an assistant can offer its user: a sprite sheet for a game, and
//! a storyboard turned into video shots.

use rmcp::model::{GetPromptResult, Prompt, PromptArgument, PromptMessage, Role};
use rmcp::ErrorData as McpError;
use serde_json::{Map, Value};

pub fn list() -> Vec<Prompt> {
    vec![
        Prompt::new(
            "sprite_sheet",
            Some("Make a set of game sprites (poses or variants of one subject) and save them into a game's assets with a manifest"),
            Some(vec![
                arg("subject", "The character or object, e.g. 'a knight with a blue cape'", true),
                arg("poses", "Comma-separated poses or variants, e.g. 'idle, walk, jump, attack'", true),
                arg("style", "pixel_art, 8bit, 16bit, retro or game_sprite (default pixel_art)", false),
                arg("size", "Sprite size in pixels, e.g. 64 (default 512, generated then kept)", false),
                arg("directory", "Where to save them, inside the gateway's allowed roots (e.g. sprites/knight)", false),
            ]),
        ),
        Prompt::new(
            "storyboard_to_video",
            Some("Turn a short storyboard into keyframes and image-to-video shots"),
            Some(vec![
                arg("story", "The storyboard: one shot per line", true),
                arg("seconds_per_shot", "Length of each shot in seconds (default 3)", false),
                arg("style", "A visual style applied to every shot", false),
            ]),
        ),
    ]
}

fn arg(name: &str, description: &str, required: bool) -> PromptArgument {
    let mut a = PromptArgument::new(name);
    a.description = Some(description.into());
    a.required = Some(required);
    a
}

fn get<'a>(args: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    args.get(key)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

fn required<'a>(args: &'a Map<String, Value>, key: &str) -> Result<&'a str, McpError> {
    get(args, key)
        .ok_or_else(|| McpError::invalid_params(format!("argument `{key}` is required"), None))
}

/// A numeric prompt argument (prompt arguments are strings): `default` when
/// absent, else a number within `min..=max` (and a multiple of `step` when given),
/// or an invalid-params error naming the argument.
fn number(
    args: &Map<String, Value>,
    key: &str,
    default: f64,
    (min, max): (f64, f64),
    step: Option<u32>,
) -> Result<f64, McpError> {
    let Some(text) = get(args, key) else {
        return Ok(default);
    };
    let bad = |why: String| {
        McpError::invalid_params(format!("argument `{key}` {why}, got {text:?}"), None)
    };
    let n: f64 = text
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite())
        .ok_or_else(|| bad("must be a number".into()))?;
    if n < min || n > max {
        return Err(bad(format!("must be between {min} and {max}")));
    }
    if let Some(step) = step {
        if n.fract() != 0.0 || !(n as u64).is_multiple_of(u64::from(step)) {
            return Err(bad(format!("must be a whole multiple of {step}")));
        }
    }
    Ok(n)
}

pub fn get_prompt(name: &str, args: &Map<String, Value>) -> Result<GetPromptResult, McpError> {
    let text = match name {
        "sprite_sheet" => {
            let subject = required(args, "subject")?;
            let poses: Vec<&str> = required(args, "poses")?
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .collect();
            let style = get(args, "style").unwrap_or("pixel_art");
            let size = number(args, "size", 512.0, (64.0, 4096.0), Some(8))?;
            let dir = get(args, "directory").unwrap_or("sprites");
            let list = poses
                .iter()
                .map(|p| format!("- {subject}, {p}"))
                .collect::<Vec<_>>()
                .join("\n");
            format!(
                "Make a consistent sprite set of {subject} in the `{style}` style, one sprite per pose:\n{list}\n\n\
                 1. Call `generate_batch` with one prompt per pose above, `style: \"{style}\"`, width and height {size} \
                 (a multiple of 8), and one shared `seed` so the sprites look alike.\n\
                 2. Show me the results. For any I reject, call `generate_sprite` again with a new seed.\n\
                 3. Save each accepted sprite with `save_output` into `{dir}` with `manifest: \"sprites.assets.json\"`, \
                 `asset_key` set to the pose name and `remove_background: true`, so the game can load them by key."
            )
        }
        "storyboard_to_video" => {
            let story = required(args, "story")?;
            let seconds = number(args, "seconds_per_shot", 3.0, (0.1, 120.0), None)?;
            let style = get(args, "style")
                .map(|s| format!(", {s}"))
                .unwrap_or_default();
            let shots = story
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .enumerate()
                .map(|(i, l)| format!("{}. {l}", i + 1))
                .collect::<Vec<_>>()
                .join("\n");
            format!(
                "Turn this storyboard into video, one shot per line:\n{shots}\n\n\
                 1. Call `generate_batch` with one keyframe prompt per shot{style}, at 832x480, one shared seed.\n\
                 2. Show me the keyframes; regenerate any I reject.\n\
                 3. For each accepted keyframe call `generate_video` with `image: {{\"artifact\": <its artifact id>}}`, \
                 the shot's text as prompt, and `seconds: {seconds}`. Report each video's link and path."
            )
        }
        other => {
            return Err(McpError::invalid_params(
                format!("no prompt named {other:?}"),
                None,
            ))
        }
    };
    let mut result = GetPromptResult::new(vec![PromptMessage::new_text(Role::User, text)]);
    result.description = list()
        .into_iter()
        .find(|p| p.name == name)
        .and_then(|p| p.description);
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn numeric_arguments_are_checked() {
        let story = |s: Value| {
            get_prompt(
                "storyboard_to_video",
                &args(json!({"story": "a\nb", "seconds_per_shot": s})),
            )
        };
        let e = story(json!("abc")).unwrap_err();
        assert!(
            e.message.contains("seconds_per_shot") && e.message.contains("number"),
            "{}",
            e.message
        );
        assert!(story(json!("500")).unwrap_err().message.contains("between"));
        let ok = story(json!("2.5")).unwrap();
        assert!(format!("{:?}", ok.messages).contains("seconds: 2.5"));
        let sheet = |s: &str| {
            get_prompt(
                "sprite_sheet",
                &args(json!({"subject": "a cat", "poses": "idle", "size": s})),
            )
        };
        assert!(sheet("500").unwrap_err().message.contains("multiple of 8"));
        assert!(format!("{:?}", sheet("256").unwrap().messages).contains("256"));
    }
}
